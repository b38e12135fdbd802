"""Documents and stream positions: what every job learns from, whatever the source.

A ``Document`` is one text with an id and the place it came from (``shard``, 1-based ``line``);
``meta`` holds the source record's other fields (e.g. the ``object`` the oracle weights). The
nightly sources produce them from shards; the benchmarks build them from their data sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Position:
    """Where a pass over a stream stands: after record ``line`` of ``shard`` (None: at the start).

    ``tokens`` counts tokens of the *next* document already consumed, so a resumed pass can cut
    that document exactly where the interrupted one stopped.
    """

    shard: str | None = None
    line: int = 0
    tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict | Position | None) -> Position:
        if obj is None or isinstance(obj, Position):
            return obj or cls()
        pos = cls(obj.get("shard"), int(obj.get("line", 0)), int(obj.get("tokens", 0)))
        if pos.line < 0 or pos.tokens < 0 or (pos.shard is None and pos.line):
            raise ValueError(f"Position: invalid {obj!r}")
        return pos


@dataclass(frozen=True)
class Document:
    """One document; ``shard`` and ``line`` say where it came from."""

    id: str
    text: str
    shard: str
    line: int
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def position(self) -> Position:
        """The position right after this document."""
        return Position(self.shard, self.line)

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "shard": self.shard, "line": self.line, "meta": self.meta}

    @classmethod
    def from_json(cls, obj: dict) -> Document:
        return cls(obj["id"], obj["text"], obj["shard"], obj["line"], obj.get("meta", {}))
