"""The package format (docs/package-format.md) as types: the exporter writes a package through `Manifest.save`,
the runtime reads one through `Manifest.load`, and both go through the same JSON mapping.

A package is untrusted input. `load` reads manifest.json (size-capped, never through a link or a FIFO), checks
the manifest's digest, maps every field with its type, confines every path to the package (package_files.py),
runs the one validation pass (manifest_checks.py: ranges, bytes present, disjoint expert ranges, tensor tables)
and verifies the backbone graphs, weights and tokenizer against their checksums once. Every failure is one
EdgeMoeError naming the file and field. Experts are verified on every read by the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from .errors import EdgeMoeError
from .fields import Fields
from .package_files import MANIFEST_MAX_BYTES, REEXPORT, Confined, confine, file_checksum, package_root, read_capped

FORMAT_VERSION = 2
EXPERT_DTYPES = ("float32", "float16", "q8", "q4", "q2")


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the expert's offset
    nbytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, f: Fields) -> "TensorRecord":
        return cls(f.str("name"), f.str("dtype"), tuple(f.ints("shape", 0, 1 << 40)), f.int("offset", 0),
                   f.int("nbytes", 0))


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

    @property
    def quantized(self) -> bool:
        return self.dtype in ("q2", "q4", "q8")

    def to_json(self, root: Path) -> dict:
        bits = {"float32": 32, "float16": 16, "q8": 8, "q4": 4, "q2": 2}[self.dtype]
        quantized = {"block_size": self.block_size, "zero_points": self.zero_points} if self.quantized else {}
        return {"layer": self.layer, "index": self.index, "graph": _relative(self.graph, root),
                "blob": _relative(self.blob, root), "offset": self.offset, "length": self.length,
                "dtype": self.dtype, "bits": bits, **quantized, "checksum": self.checksum, "kind": self.kind,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, f: Fields, file) -> "ExpertRecord":
        """`file(relative, field)` -> the confined path (Manifest.from_json's)."""
        dtype = f.choice("dtype", EXPERT_DTYPES, "or install a newer edge_moe")
        quantized = dtype in ("q2", "q4", "q8")
        return cls(f.int("layer", 0), f.int("index", 0), file(f.str("graph"), f.field("graph")),
                   file(f.str("blob"), f.field("blob")), f.int("offset", 0), f.int("length", 1),
                   dtype, f.checksum("checksum"), f.str("kind"), f.int("hidden_size", 1),
                   f.int("intermediate_size", 1), tuple(TensorRecord.from_json(t) for t in f.objects("tensors")),
                   f.int("block_size", 1) if quantized else 0, f.bool("zero_points") if quantized else False)


@dataclass
class Manifest:
    root: Path
    family: str
    dtype: str
    config: dict  # the architecture; manifest_checks.py validates the keys the runtime reads
    source_config: dict
    tokenizer: Path | None
    embed: Path
    layers: list[Path]
    head: Path
    backbone_bytes: int
    backbone_blob: Path | None = None
    routers: dict = field(default_factory=dict)  # layer -> {"weight"|"norm": {dtype, shape, offset, nbytes}}
    experts: dict[tuple[int, int], ExpertRecord] = field(default_factory=dict)
    # path relative to root -> (bytes, "xxh3_64:..."): every file but the expert blobs (checksummed per expert)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    edge_moe_version: str = ""
    quantization: dict | None = None  # informational: how the experts were quantized
    backbone_quantization: dict | None = None  # informational: export --backbone-bits
    names: dict[Path, str] = field(default_factory=dict, repr=False)  # resolved path -> name in the manifest

    @property
    def expert_bytes(self) -> int:
        return sum(e.length for e in self.experts.values())

    @property
    def backbone_files(self) -> list[Path]:
        """What the runtime reads whole at load: the backbone graphs, their weights and the tokenizer."""
        files = [self.embed, *self.layers, self.head, self.backbone_blob]
        return files + ([self.tokenizer] if self.tokenizer else [])

    def relative(self, path: Path) -> str:
        """The name under which the manifest lists `path` (a link inside the package keeps its own name)."""
        return self.names.get(path) or _relative(path, self.root)

    # JSON ----------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The manifest.json object, sealed with its digest."""
        rel = self.relative
        data = {
            "format_version": FORMAT_VERSION, "edge_moe_version": self.edge_moe_version, "family": self.family,
            "dtype": self.dtype, "config": self.config, "source_config": self.source_config,
            "tokenizer": rel(self.tokenizer) if self.tokenizer else None,
            "backbone": {"embed": rel(self.embed), "layers": [rel(p) for p in self.layers], "head": rel(self.head),
                         "blob": rel(self.backbone_blob), "bytes": self.backbone_bytes,
                         "routers": {str(layer): entry for layer, entry in self.routers.items()}},
            "experts": [self.experts[key].to_json(self.root) for key in sorted(self.experts)],
            "files": {name: {"bytes": size, "checksum": checksum} for name, (size, checksum) in sorted(self.files.items())},
            **({"quantization": self.quantization} if self.quantization is not None else {}),
            **({"backbone_quantization": self.backbone_quantization} if self.backbone_quantization else {}),
        }
        return seal(data)

    def save(self) -> Path:
        """Checksums every file the manifest names but the expert blobs, then writes root/manifest.json durably."""
        from .files import write_text_atomic

        names = [*self.backbone_files, *(e.graph for e in self.experts.values())]
        self.files = {self.relative(p): file_checksum(p) for p in names}
        return write_text_atomic(self.root / "manifest.json", json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: dict, root: Path, path: Path) -> "Manifest":
        names: dict[Path, str] = {}
        confined = Confined(root)

        def file(relative, field_name: str) -> Path:
            real = confined.file(relative, field_name)
            names[real] = relative
            return real

        top = Fields(data, str(path))
        backbone = top.object("backbone")
        manifest = cls(
            root=root, family=top.str("family"), dtype=top.choice("dtype", ("float32", "float16")),
            config=top.object("config").data, source_config=top.optional_object("source_config"),
            tokenizer=file(top.data["tokenizer"], "tokenizer") if top.data.get("tokenizer") is not None else None,
            embed=file(backbone.str("embed"), "backbone.embed"),
            layers=[file(p, f"backbone.layers[{i}]") for i, p in enumerate(backbone.list("layers"))],
            head=file(backbone.str("head"), "backbone.head"),
            backbone_bytes=backbone.int("bytes", 0),
            backbone_blob=file(backbone.str("blob"), "backbone.blob"),
            routers={_layer_key(key, path): value.data
                     for key, value in backbone.object("routers", required=False).items()},
            edge_moe_version=str(top.data.get("edge_moe_version", "")),
            quantization=top.optional_object("quantization") or None,
            backbone_quantization=top.optional_object("backbone_quantization") or None,
        )
        manifest.names = names
        for f in top.objects("experts"):
            record = ExpertRecord.from_json(f, file)
            if record.key in manifest.experts:
                raise EdgeMoeError(f"{path}: expert {record.key} (layer, index) has two records; {REEXPORT}")
            manifest.experts[record.key] = record
        for name, entry in top.object("files").items():
            file(name, f"files[{name[:80]!r}]")
            manifest.files[name] = (entry.int("bytes", 0), entry.checksum("checksum"))
        return manifest

    @classmethod
    def load(cls, root: str | Path, verify_backbone: bool = True) -> "Manifest":
        """Reads, validates and checks root/manifest.json, and verifies the backbone's checksums.

        Raises:
            EdgeMoeError: naming the file or field at fault and the fix.
        """
        from .manifest_checks import validate

        root = package_root(root)
        path = root / "manifest.json"
        if not path.exists() and not path.is_symlink():
            raise EdgeMoeError(f"{path}: missing; {root} is not an edge_moe package ({REEXPORT})")
        data = parse_json(read_capped(confine(root, "manifest.json", "manifest.json"), MANIFEST_MAX_BYTES,
                                      "manifest.json"), path)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise EdgeMoeError(f"{path}: format_version {version!r} is not supported (this edge_moe reads "
                               f"{FORMAT_VERSION}); {REEXPORT}, or install the edge_moe that wrote it")
        expected = digest(data)
        if data.get("digest") != expected:
            raise EdgeMoeError(f"{path}: the manifest's digest {str(data.get('digest'))[:40]!r} does not match its "
                               f"content ({expected}): the file was changed or damaged; {REEXPORT}")
        manifest = cls.from_json(data, root, path)
        validate(manifest, path)
        if verify_backbone:
            manifest.verify_files(manifest.backbone_files)
        return manifest

    def verify_files(self, paths) -> None:
        """Each file's size and checksum against the manifest's `files` table.

        Raises:
            EdgeMoeError: a file is not in the table, or its bytes differ.
        """
        for p in paths:
            name = self.relative(p)
            if name not in self.files:
                raise EdgeMoeError(f"{self.root / 'manifest.json'}: files has no checksum for {name!r}; {REEXPORT}")
            size, checksum = self.files[name]
            actual_size = p.stat().st_size
            if actual_size != size:
                raise EdgeMoeError(f"{p}: {actual_size:,} bytes where the manifest says {size:,}: the file is "
                                   f"truncated or replaced; {REEXPORT}")
            if file_checksum(p, name)[1] != checksum:
                raise EdgeMoeError(f"{p}: checksum mismatch (manifest {checksum}): the file is damaged; {REEXPORT}")


def expert_seed(key: tuple[int, int]) -> int:
    """The XXH3 seed of an expert's checksum: its (layer, index), so the bytes are bound to the expert's identity."""
    return (key[0] << 32) | key[1]


def parse_json(raw: bytes, path: Path) -> dict:
    """manifest.json's bytes -> its object; NaN, Infinity and nesting too deep to read are malformed JSON too."""
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise EdgeMoeError(f"{path}: corrupt JSON ({str(exc)[:200]}); {REEXPORT}") from None
    if not isinstance(data, dict):
        raise EdgeMoeError(f"{path}: not a JSON object; {REEXPORT}")
    return data


def digest(data: dict) -> str:
    """XXH3-64 of the manifest without its `digest` field, in a canonical form (sorted keys, no spaces): it covers
    the files table, and so, through their checksums, every byte of the package."""
    rest = {k: v for k, v in data.items() if k != "digest"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return f"xxh3_64:{xxhash.xxh3_64_hexdigest(canonical.encode())}"


def seal(data: dict) -> dict:
    """`data` with its digest field (re)computed: what export writes, and what tests use after editing a field."""
    return {**{k: v for k, v in data.items() if k != "digest"}, "digest": digest(data)}


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _layer_key(key: str, path: Path) -> int:
    if not (isinstance(key, str) and key.isdigit() and key.isascii() and len(key) < 7):
        raise EdgeMoeError(f"{path}: backbone.routers: key {key[:40]!r} is not a layer number; {REEXPORT}")
    return int(key)
