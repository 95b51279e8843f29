"""The formats an option chooses among, each by its name or an alias of it (LMDeploy's names):
the ``--*-parser`` options' (``tool_parsers``, ``reasoning_parsers``) and the builtin chat templates
(``chat_template_builtins``)."""
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

    def canonical(self, name: str) -> str:
        """The name of the format ``name`` names (itself, or the one it is an alias of); ValueError
        listing the names otherwise."""
        key = self.aliases.get(name, name)
        if key not in self.formats:
            raise ValueError(f'unknown {self.what} {name!r}; choose one of {", ".join(self.names)}')
        return key

    def get(self, name: str) -> Format:
        """The format named ``name`` (or an alias of it); ValueError listing the names otherwise."""
        return self.formats[self.canonical(name)]
