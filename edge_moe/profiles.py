"""Device profiles: what a device class offers the runtime (RAM, flash, cores, memory bandwidth, accelerator),
each number with its source. The format is documented in profiles/README.md; the shipped files are profiles/*.toml,
installed as edge_moe/device_profiles/ (pyproject maps the folder).

Units inside the files are the ones datasheets use (GB = 1e9 bytes, MB/s = 1e6 bytes/s); `DeviceProfile` holds
bytes and bytes/s so that the planner and the emulator never convert twice.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeMoeError
from .files import check_writable_path, write_text_atomic

FORMAT_VERSION = 1
# installed: edge_moe/device_profiles; in a source checkout (or an editable install): the repository's profiles/
PROFILE_DIR = next((d for d in (Path(__file__).with_name("device_profiles"), Path(__file__).parents[1] / "profiles")
                    if d.is_dir()), Path(__file__).with_name("device_profiles"))

# section -> field -> (kind, lower bound, upper bound); kind "num" needs a [sources] entry, "str" does not
SCHEMA: dict[str, dict[str, tuple]] = {
    "memory": {"ram_gb": ("num", 0.0, None), "usable_fraction": ("num", 0.0, 1.0), "bandwidth_gb_s": ("num", 0.0, None)},
    "flash": {"kind": ("str",), "seq_read_mb_s": ("num", 0.0, None), "rand4k_read_mb_s": ("num", 0.0, None)},
    "cpu": {"name": ("str",), "cores": ("int", 1, None), "gflops_fp32": ("num", 0.0, None)},
    "accelerator": {"kind": ("str",), "memory_gb": ("num", -1e-9, None)},
}
TOP = {"format_version", "name", "description", "notes", "sources", "measured", *SCHEMA}
# optional fields: section -> field -> the values allowed. cpu.isa says whether edge_moe's kernels (AVX2, FMA and F16C
# at least: x86-64-v3) run there, which decides what a resident quantized expert costs (its read buffer alone, or a
# MatMulNBits session beside it: edge_moe.quant); absent, the planner assumes they do not.
OPTIONAL: dict[str, dict[str, tuple[str, ...]]] = {"cpu": {"isa": ("x86-64-v3", "x86-64", "arm64", "other")}}


@dataclass
class DeviceProfile:
    """A validated profile in bytes and bytes/s. `measured` holds what `edge-moe profile` measured (or {})."""

    name: str
    description: str
    notes: str
    ram_bytes: int
    usable_fraction: float
    memory_bandwidth: float
    flash_kind: str
    flash_seq_read: float
    flash_rand4k_read: float
    cpu_name: str
    cores: int
    cpu_flops: float
    isa: str  # cpu.isa, "" where the profile does not say
    accelerator: str
    accelerator_bytes: int
    sources: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    path: str = ""

    @property
    def usable_ram_bytes(self) -> int:
        return int(self.ram_bytes * self.usable_fraction)

    @property
    def has_kernels(self) -> bool:
        """Whether edge_moe's CPU kernels run on this device (cpu.isa x86-64-v3)."""
        return self.isa == "x86-64-v3"

    @property
    def read_latency(self) -> float:
        """Seconds a read costs beyond its transfer: 4 KiB at the random rate minus 4 KiB at the sequential rate."""
        return max(0.0, 4096 / self.flash_rand4k_read - 4096 / self.flash_seq_read)

    def read_seconds(self, nbytes: int) -> float:
        """Time the device needs for one contiguous read of nbytes."""
        return self.read_latency + nbytes / self.flash_seq_read


def _where(path: str, key: str) -> str:
    return f"{path}: field '{key}'"


def _check_field(path: str, key: str, value, spec: tuple) -> None:
    kind = spec[0]
    if kind == "str":
        if not isinstance(value, str):
            raise EdgeMoeError(f"{_where(path, key)} is {value!r}; it must be a string")
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "int":
        ok = ok and float(value).is_integer()
    if not ok:
        raise EdgeMoeError(f"{_where(path, key)} is {value!r}; it must be a finite "
                           f"{'integer' if kind == 'int' else 'number'}")
    low, high = spec[1], spec[2]
    if value <= low if kind == "num" else value < low:
        raise EdgeMoeError(f"{_where(path, key)} is {value}; it must be {'above' if kind == 'num' else 'at least'} "
                           f"{max(low, 0)}")
    if high is not None and value > high:
        raise EdgeMoeError(f"{_where(path, key)} is {value}; it must be at most {high}")


def validate(data: dict, path: str = "<profile>", require_sources: bool = True) -> None:
    """Checks a parsed profile against the format.

    Args:
        data: the parsed TOML (or JSON) document.
        path: named in error messages.
        require_sources: every number needs a "section.field" entry in [sources] (measured profiles have one too).

    Raises:
        EdgeMoeError: naming the first bad, missing or unknown field and what it must be.
    """
    if not isinstance(data, dict):
        raise EdgeMoeError(f"{path}: a profile is a TOML table; see profiles/README.md")
    unknown = sorted(set(data) - TOP)
    if unknown:
        raise EdgeMoeError(f"{_where(path, unknown[0])} is unknown; allowed top-level fields: {sorted(TOP)}")
    if data.get("format_version") != FORMAT_VERSION:
        raise EdgeMoeError(f"{_where(path, 'format_version')} is {data.get('format_version')!r}; this edge_moe "
                           f"reads format_version = {FORMAT_VERSION}")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise EdgeMoeError(f"{_where(path, key)} is missing or empty; give a non-empty string")
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise EdgeMoeError(f"{_where(path, 'sources')} must be a table of \"section.field\" = \"where the number "
                           "comes from\"")
    for section, fields in SCHEMA.items():
        table = data.get(section)
        if not isinstance(table, dict):
            raise EdgeMoeError(f"{_where(path, section)} is missing; add a [{section}] table with "
                               f"{', '.join(fields)}")
        optional = OPTIONAL.get(section, {})
        for key in sorted(set(table) - set(fields) - set(optional)):
            raise EdgeMoeError(f"{_where(path, f'{section}.{key}')} is unknown; [{section}] takes "
                               f"{', '.join([*fields, *optional])}")
        for key, allowed in optional.items():
            if key in table and table[key] not in allowed:
                raise EdgeMoeError(f"{_where(path, f'{section}.{key}')} is {table[key]!r}; give one of "
                                   f"{', '.join(allowed)}")
        for key, spec in fields.items():
            name = f"{section}.{key}"
            if key not in table:
                raise EdgeMoeError(f"{_where(path, name)} is missing; add it to [{section}]")
            _check_field(path, name, table[key], spec)
            if spec[0] != "str" and require_sources and not str(sources.get(name, "")).strip():
                raise EdgeMoeError(f"{_where(path, name)} has no source; add \"{name}\" = \"where this number "
                                   "comes from\" to [sources]")
    for name in sorted(sources):
        section, _, key = name.partition(".")
        if key not in SCHEMA.get(section, {}):
            raise EdgeMoeError(f"{_where(path, 'sources.' + name)} names no profile field; use \"section.field\"")


def from_dict(data: dict, path: str = "<profile>") -> DeviceProfile:
    """Validates `data` and converts it to a DeviceProfile (bytes, bytes/s). Raises EdgeMoeError."""
    validate(data, path)
    m, f, c, a = data["memory"], data["flash"], data["cpu"], data["accelerator"]
    return DeviceProfile(
        name=data["name"], description=data["description"], notes=str(data.get("notes", "")),
        ram_bytes=int(m["ram_gb"] * 1e9), usable_fraction=float(m["usable_fraction"]),
        memory_bandwidth=m["bandwidth_gb_s"] * 1e9, flash_kind=f["kind"], flash_seq_read=f["seq_read_mb_s"] * 1e6,
        flash_rand4k_read=f["rand4k_read_mb_s"] * 1e6, cpu_name=c["name"], cores=int(c["cores"]),
        cpu_flops=c["gflops_fp32"] * 1e9, isa=str(c.get("isa", "")), accelerator=a["kind"],
        accelerator_bytes=int(a["memory_gb"] * 1e9),
        sources=dict(data.get("sources", {})), measured=dict(data.get("measured", {})), path=path)


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path) -> DeviceProfile:
    """A shipped profile by name (`rpi5-8gb-microsd`) or a .toml/.json file by path.

    Raises:
        EdgeMoeError: no such profile or file, unparsable, or invalid (the message names the field).
    """
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if not path.is_file():
        shipped = PROFILE_DIR / f"{text}.toml"
        if not shipped.is_file():
            raise EdgeMoeError(f"profile {text!r} is neither a file nor a shipped profile; shipped: "
                               f"{', '.join(list_profiles())}")
        path = shipped
    try:
        if path.suffix.lower() == ".json":
            import json

            data = json.loads(path.read_text())
        else:
            data = tomllib.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise EdgeMoeError(f"{path}: cannot parse the profile ({exc}); see profiles/README.md") from None
    return from_dict(data, str(path))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(round(value, 6) if isinstance(value, float) else value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise EdgeMoeError(f"cannot write {value!r} to a profile; only strings, numbers and lists")


def dumps(data: dict) -> str:
    """TOML text of a profile dict (scalars first, then tables; nested tables as [a.b])."""
    lines: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            key = k if k.replace("_", "").isalnum() else _toml_value(k)
            lines.append(f"{key} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


PROFILE_FORMATS = (".toml", ".json")


def check_profile_path(path) -> None:
    """Refuses, before any measuring, a file name whose extension names no profile format or whose directory is
    missing. Raises EdgeMoeError."""
    path = Path(path)
    if path.suffix.lower() not in PROFILE_FORMATS:
        raise EdgeMoeError(f"{path}: a profile file ends in .toml or .json (its format follows the extension)")
    check_writable_path(path, "profile")


def write_profile(data: dict, path) -> None:
    """Validates and writes a profile atomically (files.write_text_atomic) as TOML or JSON by the file's
    extension, the format `load_profile` reads it back with. Raises EdgeMoeError."""
    import json

    check_profile_path(path)
    validate(data, str(path))
    text = json.dumps(data, indent=2) + "\n" if Path(path).suffix.lower() == ".json" else dumps(data)
    write_text_atomic(path, text)
