"""The formats a ``--*-parser`` option chooses among, each by its name or an alias of it (LMDeploy's
names), shared by ``tool_parsers`` and ``reasoning_parsers``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

Format = TypeVar('Format')


@dataclass(frozen=True)
class NamedFormats(Generic[Format]):
    """``formats`` by name and ``aliases`` (alias -> one of those names); ``what`` names the option
    in errors (``'tool call parser'``)."""
    what: str
    formats: dict[str, Format]
    aliases: dict[str, str]

    @property
    def names(self) -> list[str]:
        """Every name the option takes, sorted: the formats' and their aliases'."""
        return sorted([*self.formats, *self.aliases])

    def get(self, name: str) -> Format:
        """The format named ``name`` (or an alias of it); ValueError listing the names otherwise."""
        key = self.aliases.get(name, name)
        if key not in self.formats:
            raise ValueError(f'unknown {self.what} {name!r}; choose one of {", ".join(self.names)}')
        return self.formats[key]
