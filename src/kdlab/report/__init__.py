"""Reports: tables (CSV/Markdown/JSON) and figures (PNG)."""
