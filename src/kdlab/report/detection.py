"""Pictures of a detection study (filled below)."""
