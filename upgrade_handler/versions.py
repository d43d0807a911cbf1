"""App versions as Teams manifests write them: dotted numbers, compared part by part (contract §8)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,3}")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """``1.4.0``: compared as integers part by part, a missing part counting as 0 (``1.4 == 1.4.0``)."""

    key: tuple[int, ...] = field(repr=False)
    text: str = field(compare=False)

    @classmethod
    def parse(cls, text: object) -> Version:
        """Raise ``ValueError`` unless ``text`` is 1 to 4 dot-separated numbers."""
        if not isinstance(text, str) or not _VERSION.fullmatch(text):
            raise ValueError(f"{text!r} is not a version of dotted numbers such as 1.4.0")
        parts = [int(part) for part in text.split(".")]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return cls(tuple(parts), text)

    def __str__(self) -> str:
        return self.text
