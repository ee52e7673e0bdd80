"""Typed reads of a JSON object from an untrusted file: each accessor checks the type and range of one field and
raises an EdgeMoeError naming the file, the field's path (`experts[3].tensors[0].offset`) and the value."""

from __future__ import annotations

import re

from .errors import EdgeMoeError
from .package_files import REEXPORT

_CHECKSUM = re.compile(r"^xxh3_64:[0-9a-f]{16}$")
MAX_INT = 1 << 62  # far above any byte count or size a package can hold; keeps arithmetic in int64


class Fields:
    """One JSON object of `file` at field path `name` (e.g. "experts[3]"; "" for the top level)."""

    def __init__(self, data, file: str, name: str = ""):
        self.file, self.name = file, name
        if not isinstance(data, dict):
            raise EdgeMoeError(f"{self.where}: expected a JSON object, got {_show(data)}; {REEXPORT}")
        self.data = data

    @property
    def where(self) -> str:
        return f"{self.file}: {self.name}" if self.name else self.file

    def field(self, key: str) -> str:
        """The field path of `key` inside this object ("experts[3].blob")."""
        return f"{self.name}.{key}" if self.name else key

    def _bad(self, key: str, expected: str, value=None) -> EdgeMoeError:
        got = "nothing (missing)" if key not in self.data else _show(self.data[key] if value is None else value)
        return EdgeMoeError(f"{self.file}: {self.field(key)}: expected {expected}, got {got}; {REEXPORT}")

    def get(self, key: str, types, expected: str):
        value = self.data.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise self._bad(key, expected)
        return value

    def int(self, key: str, lo: int = 0, hi: int = MAX_INT) -> int:
        value = self.get(key, int, f"an integer in {lo}..{hi}")
        if not lo <= value <= hi:
            raise self._bad(key, f"an integer in {lo}..{hi}")
        return value

    def str(self, key: str) -> str:
        return self.get(key, str, "a string")

    def bool(self, key: str) -> bool:
        return self.get(key, bool, "true or false")

    def number(self, key: str, lo: float, hi: float) -> float:
        value = self.get(key, (int, float), f"a number in {lo}..{hi}")
        if not lo <= value <= hi:
            raise self._bad(key, f"a number in {lo}..{hi}")
        return float(value)

    def choice(self, key: str, choices: tuple, hint: str = "") -> str:
        value = self.data.get(key)
        if value not in choices or not isinstance(value, str):
            raise self._bad(key, "one of " + ", ".join(choices) + (f" ({hint})" if hint else ""))
        return value

    def checksum(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not _CHECKSUM.match(value):
            raise self._bad(key, "'xxh3_64:<16 lowercase hex digits>'")
        return value

    def list(self, key: str, required: bool = True) -> list:
        if not required and self.data.get(key) is None:
            return []
        return self.get(key, list, "a list")

    def ints(self, key: str, lo: int = 0, hi: int = MAX_INT, required: bool = True) -> list[int]:
        values = self.list(key, required)
        for i, v in enumerate(values):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise EdgeMoeError(f"{self.file}: {self.field(key)}[{i}]: expected an integer in {lo}..{hi}, got {_show(v)}; "
                                   f"{REEXPORT}")
        return values

    def object(self, key: str, required: bool = True) -> "Fields":
        if not required and self.data.get(key) is None:
            return Fields({}, self.file, self.field(key))
        return Fields(self.get(key, dict, "an object"), self.file, self.field(key))

    def optional_object(self, key: str) -> dict:
        return self.object(key, required=False).data

    def objects(self, key: str) -> list["Fields"]:
        return [Fields(item, self.file, f"{self.field(key)}[{i}]") for i, item in enumerate(self.list(key))]

    def items(self):
        """(key, Fields) for an object of objects."""
        return [(k, Fields(v, self.file, f"{self.name}[{k[:40]!r}]")) for k, v in self.data.items()]


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
