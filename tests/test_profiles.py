"""Device profiles: every shipped file validates; bad files fail with errors that name the field."""

from __future__ import annotations

import tomllib

import pytest

from edge_moe.errors import EdgeMoeError
from edge_moe.profiles import PROFILE_DIR, SCHEMA, dumps, from_dict, list_profiles, load_profile, write_profile

GOOD = (PROFILE_DIR / "rpi5-8gb-nvme.toml").read_text()


def data():
    return tomllib.loads(GOOD)


def test_shipped_profiles_validate_and_cite_every_number():
    names = list_profiles()
    for needed in ("rpi5-8gb-microsd", "rpi5-8gb-nvme", "jetson-orin-nano-8gb", "laptop-16gb-nvme-dgpu",
                   "phone-board-12gb-ufs31", "apple-m-16gb"):
        assert needed in names
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert 0 < p.usable_ram_bytes <= p.ram_bytes
        numbers = [f"{s}.{k}" for s, fields in SCHEMA.items() for k, spec in fields.items() if spec[0] != "str"]
        assert all(p.sources[n].strip() for n in numbers)


def test_the_cpu_isa_is_optional_and_says_where_the_kernels_run():
    assert load_profile("laptop-16gb-nvme-dgpu").has_kernels and not load_profile("rpi5-8gb-nvme").has_kernels
    d = data()
    del d["cpu"]["isa"]
    assert from_dict(d).isa == "" and not from_dict(d).has_kernels  # unsaid: planned as if they did not run


def test_units_and_read_cost():
    p = load_profile("rpi5-8gb-microsd")
    assert p.flash_seq_read == 90e6 and p.ram_bytes == 8e9
    # 4 KiB at 12 MB/s (random) costs 341 us; at 90 MB/s (sequential) 45.5 us: latency is the difference
    assert p.read_latency == pytest.approx(4096 / 12e6 - 4096 / 90e6)
    assert p.read_seconds(9_000_000) == pytest.approx(p.read_latency + 0.1)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["memory"].pop("ram_gb"), "memory.ram_gb"),
    (lambda d: d["memory"].update(usable_fraction=1.5), "memory.usable_fraction"),
    (lambda d: d["flash"].update(seq_read_mb_s="fast"), "flash.seq_read_mb_s"),
    (lambda d: d["flash"].update(seq_read_mb_s=0), "flash.seq_read_mb_s"),
    (lambda d: d["cpu"].update(cores=2.5), "cpu.cores"),
    (lambda d: d["cpu"].update(threads=4), "cpu.threads"),
    (lambda d: d["cpu"].update(isa="riscv"), "cpu.isa"),
    (lambda d: d["sources"].pop("cpu.gflops_fp32"), "cpu.gflops_fp32"),
    (lambda d: d["sources"].update({"cpu.speed": "x"}), "sources.cpu.speed"),
    (lambda d: d.pop("accelerator"), "accelerator"),
    (lambda d: d.update(format_version=2), "format_version"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d.update(name=""), "name"),
])
def test_bad_profiles_name_the_field(tmp_path, mutate, field):
    d = data()
    mutate(d)
    path = tmp_path / "bad.toml"
    path.write_text(dumps(d))
    with pytest.raises(EdgeMoeError, match=f"field '{field}'"):
        load_profile(path)


def test_unparsable_and_unknown(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = [")
    with pytest.raises(EdgeMoeError, match="cannot parse"):
        load_profile(path)
    with pytest.raises(EdgeMoeError, match="rpi5-8gb-nvme"):  # lists the shipped names
        load_profile("no-such-device")


def test_round_trip_with_measured_table(tmp_path):
    d = data()
    d["measured"] = {"host": "x", "expert_ms": {"cpu": {"m1": 0.2}}}
    write_profile(d, tmp_path / "m.toml")
    p = load_profile(tmp_path / "m.toml")
    assert p.measured["expert_ms"]["cpu"]["m1"] == 0.2
    assert not list(tmp_path.glob("*.tmp"))
