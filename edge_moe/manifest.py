"""Reads and validates a package's manifest.json (format in docs/package-format.md).

Everything a later step would trip over is checked here, at load, with an error that names the file and the fix:
missing or corrupt manifest, unknown format version, missing graphs, truncated blobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeMoeError

FORMAT_VERSION = 1
_EXPERT_DTYPES = ("float32", "float16", "q8", "q4", "q2")
_REEXPORT = "re-export the model with `edge-moe export HF_DIR OUT_DIR`"


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the expert's offset
    nbytes: int


@dataclass(frozen=True)
class ExpertRecord:
    layer: int
    index: int
    graph: Path
    blob: Path
    offset: int
    length: int
    dtype: str
    checksum: str
    kind: str
    hidden_size: int
    intermediate_size: int
    tensors: tuple[TensorRecord, ...]
    block_size: int = 0  # quantized experts (dtype q2/q4/q8) only
    zero_points: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.index)


@dataclass
class Manifest:
    root: Path
    family: str
    dtype: str
    config: dict
    source_config: dict
    tokenizer: Path | None
    embed: Path
    layers: list[Path]
    head: Path
    backbone_bytes: int
    backbone_blob: Path | None = None
    routers: dict = field(default_factory=dict)  # layer -> {"weight"|"norm": {dtype, shape, offset, nbytes}}
    experts: dict[tuple[int, int], ExpertRecord] = field(default_factory=dict)

    @property
    def expert_bytes(self) -> int:
        return sum(e.length for e in self.experts.values())

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        """Reads and checks root/manifest.json.

        Raises:
            EdgeMoeError: naming the file or field at fault and the fix.
        """
        root = Path(root)
        path = root / "manifest.json"
        if not root.is_dir():
            raise EdgeMoeError(f"{root}: no such model directory; pass a package made by `edge-moe export`")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgeMoeError(f"{path}: missing; {root} is not an edge_moe package ({_REEXPORT})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgeMoeError(f"{path}: corrupt JSON ({exc}); {_REEXPORT}") from None
        if not isinstance(data, dict):
            raise EdgeMoeError(f"{path}: not a JSON object; {_REEXPORT}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise EdgeMoeError(f"{path}: format_version {version!r} is not supported (this edge_moe reads "
                               f"{FORMAT_VERSION}); {_REEXPORT}, or install the edge_moe that wrote it")
        try:
            backbone = data["backbone"]
            manifest = cls(
                root=root, family=str(data["family"]), dtype=str(data["dtype"]), config=dict(data["config"]),
                source_config=dict(data.get("source_config") or {}),
                tokenizer=root / data["tokenizer"] if data.get("tokenizer") else None,
                embed=root / backbone["embed"], layers=[root / p for p in backbone["layers"]],
                head=root / backbone["head"], backbone_bytes=int(backbone["bytes"]),
                backbone_blob=root / backbone["blob"],
                routers={int(layer): entry for layer, entry in (backbone.get("routers") or {}).items()},
            )
            for e in data["experts"]:
                tensors = tuple(TensorRecord(t["name"], t["dtype"], tuple(t["shape"]), int(t["offset"]),
                                             int(t["nbytes"])) for t in e["tensors"])
                record = ExpertRecord(int(e["layer"]), int(e["index"]), root / e["graph"], root / e["blob"],
                                      int(e["offset"]), int(e["length"]), str(e["dtype"]), str(e["checksum"]),
                                      str(e["kind"]), int(e["hidden_size"]), int(e["intermediate_size"]), tensors,
                                      int(e.get("block_size", 0)), bool(e.get("zero_points", False)))
                if record.dtype not in _EXPERT_DTYPES:
                    raise EdgeMoeError(f"{path}: expert {record.key} has dtype {record.dtype!r}, not one of "
                                       f"{', '.join(_EXPERT_DTYPES)}; {_REEXPORT}, or install a newer edge_moe")
                if record.dtype in ("q2", "q4", "q8") and record.block_size <= 0:
                    raise EdgeMoeError(f"{path}: expert {record.key} ({record.dtype}) has no block_size; {_REEXPORT}")
                manifest.experts[record.key] = record
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeMoeError(f"{path}: field {exc} is missing or malformed; {_REEXPORT}") from None
        manifest._check(path)
        return manifest

    def _check(self, path: Path) -> None:
        c = self.config
        for name in ("hidden_size", "num_layers", "vocab_size", "num_experts", "top_k", "moe_layers"):
            if name not in c:
                raise EdgeMoeError(f"{path}: config.{name} is missing; {_REEXPORT}")
        if len(self.layers) != c["num_layers"]:
            raise EdgeMoeError(f"{path}: backbone.layers lists {len(self.layers)} graphs for "
                               f"{c['num_layers']} layers; {_REEXPORT}")
        expected = {(layer, e) for layer in c["moe_layers"] for e in range(c["num_experts"])}
        missing = sorted(expected - set(self.experts))
        if missing:
            raise EdgeMoeError(f"{path}: no record for expert {missing[0]} (layer, index); {_REEXPORT}")
        for graph in [self.embed, self.head, *self.layers]:
            if not graph.exists():
                raise EdgeMoeError(f"{graph}: missing from the package; {_REEXPORT}")
        if self.tokenizer is not None and not self.tokenizer.exists():
            raise EdgeMoeError(f"{self.tokenizer}: missing from the package; {_REEXPORT}")
        ends: dict[Path, int] = {}
        for e in self.experts.values():
            ends[e.blob] = max(ends.get(e.blob, 0), e.offset + e.length)
        for blob, end in ends.items():
            size = blob.stat().st_size if blob.exists() else None
            if size is None:
                raise EdgeMoeError(f"{blob}: expert blob missing; {_REEXPORT}")
            if size < end:
                raise EdgeMoeError(f"{blob}: truncated ({size} bytes, experts need {end}); {_REEXPORT}")
