"""A small name -> object registry with descriptions (models, loss terms)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Entry:
    name: str
    obj: Any
    description: str = ""
    reference: str = ""
    meta: dict = field(default_factory=dict)


class Registry:
    """Maps names to objects. Unknown names fail with the closest known names."""

    def __init__(self, kind: str, listing: str | None = None):
        """``listing``: the kdlab command that lists the entries (``kdlab losses``), named in the
        error for an unknown name; without one the error lists the names itself."""
        self.kind = kind
        self.listing = listing
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str = "", reference: str = "", **meta) -> Callable:
        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, obj, description, reference, meta)
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            known = (f"see `{self.listing}` for the list" if self.listing
                     else f"known: {', '.join(self.names()) or 'none'}")
            raise KeyError(f"unknown {self.kind} '{name}'{hint} ({known})")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]
