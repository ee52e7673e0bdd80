"""`edge-moe profile` measures this machine on a model and writes a profile that loads, with the figures the
planner reads (the model's resident decode and what one cache miss costs)."""

from edge_moe.cli import main
from edge_moe.profiles import load_profile


def test_profile_of_this_machine_on_a_model_loads_and_feeds_the_planner(tiny_package, tmp_path):
    out = tmp_path / "host.toml"
    assert main(["profile", "--model", str(tiny_package[0]), "--out", str(out)]) == 0
    p = load_profile(str(out))
    assert p.flash_seq_read > 0 and p.memory_bandwidth > 0 and p.cores >= 1
    model = p.measured["model"]
    assert model["decode_ms_per_token"] > 0 and model["prefill_ms_per_token"] > 0
    assert model["miss_overhead_ms"] >= 0
    assert model["shape"] == f"{p.measured['expert_shape']}"
