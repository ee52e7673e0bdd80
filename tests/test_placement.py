"""Devices, the placement cost model, and the accelerator tier run on a CPU stand-in with stub cost tables:
decisions, per-tier budgets, promotion, eviction, and outputs equal to the CPU-only path. (The CUDA check, logits of
--device cuda against --device cpu, runs on a GPU machine: edge_moe.bench.cooperative.)"""

import json

import numpy as np
import pytest

import edge_moe
from edge_moe.cli import build_parser, load_options
from edge_moe.devices import CPU, Device, resolve_device
from edge_moe.errors import EdgeMoeError
from edge_moe.expert_graph import ExpertShape
from edge_moe.placement import CostModel, ShapeCosts, load_or_calibrate, shape_key
from edge_moe_export.exporter import export_checkpoint
from edge_moe_export.synthetic import PRESETS, write_synthetic_checkpoint

STANDIN = Device("standin", ("CPUExecutionProvider",))  # an "accelerator" on the CPU provider
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    preset = dict(PRESETS["tiny"], num_layers=3)
    preset.pop("dtype")
    write_synthetic_checkpoint(root / "hf", **preset, progress=False)
    return export_checkpoint(root / "hf", root / "pkg", progress=False)


def stub(package, cpu_ms=(0.2, 5.0), gpu_ms=(0.05, 0.3), upload_ms=0.8) -> CostModel:
    """A cost table for the package's one expert shape, measured at T = 1 and 512."""
    record = next(iter(edge_moe.load(package, budget="50%").manifest.experts.values()))
    shape = ExpertShape(record.kind, record.hidden_size, record.intermediate_size, record.dtype)
    costs = ShapeCosts([1, 512], [c / 1e3 for c in cpu_ms], [g / 1e3 for g in gpu_ms], upload_ms / 1e3,
                       record.length)
    return CostModel({shape_key(shape): costs})


def tier_model(package, **options):
    options.setdefault("budget", "50%")
    return edge_moe.load(package, device=STANDIN, trace=True, **options)


# Devices ----------------------------------------------------------------------------------------------------

def test_device_names():
    assert resolve_device("cpu") is CPU and resolve_device(None) is CPU and not CPU.accelerator
    assert resolve_device(STANDIN) is STANDIN and STANDIN.accelerator
    with pytest.raises(EdgeMoeError, match="unknown; choose one of cpu, auto, cuda"):
        resolve_device("tpu")


def test_auto_falls_back_to_the_cpu_with_a_notice():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    lines = []
    assert resolve_device("auto", notice=lines.append) is CPU
    assert len(lines) == 1 and "running on the CPU" in lines[0]
    with pytest.raises(EdgeMoeError, match="onnxruntime-gpu"):
        resolve_device("cuda")


def test_cli_passes_device_options():
    args = build_parser().parse_args(["generate", "--device", "cuda", "--gpu-budget", "25%", "--gpu-policy", "lru",
                                      "--prompt-ids", "1"])
    options = load_options(args)
    assert (options["device"], options["gpu_budget"], options["gpu_policy"]) == ("cuda", "25%", "lru")


# Cost model -------------------------------------------------------------------------------------------------

def test_cost_model_decides_by_tokens(package):
    model = stub(package)
    expert = next(iter(edge_moe.load(package).experts.experts.values()))
    assert model.choose(expert, 1) == "cpu"  # decode: 0.2 ms on the CPU < 0.8 + 0.05 ms
    assert model.choose(expert, 512) == "upload"  # long prefill: 5 ms > 0.8 + 0.3 ms
    assert model.choose(expert, 1, resident=True) == "gpu"
    t = model.crossover(expert)
    assert model.choose(expert, t - 1) == "cpu" and model.choose(expert, t) == "upload" and 1 < t < 512
    assert model.predict(expert, 1024)["cpu"] > model.predict(expert, 512)["cpu"]  # extrapolated past 512
    assert CostModel.from_json(json.loads(json.dumps(model.to_json()))).crossover(expert) == t
    with pytest.raises(EdgeMoeError, match="no entry for expert shape"):
        CostModel({}).choose(expert, 1)


def test_calibration_is_cached_per_machine(package, tmp_path):
    expert = next(iter(edge_moe.load(package).experts.experts.values()))
    calls = {"samples": 0}

    def sample():
        calls["samples"] += 1
        return expert

    kernels = edge_moe.load(package).kernels
    args = ({"s": sample}, kernels.run, lambda e: e, kernels.run)
    path = tmp_path / "placement.json"
    first = load_or_calibrate(STANDIN, 2, *args, path=path)
    assert calls["samples"] == 1 and set(first.shapes) == {"s"} and first.shapes["s"].tokens == [1, 8, 64, 512]
    again = load_or_calibrate(STANDIN, 2, *args, path=path)
    assert calls["samples"] == 1 and again.shapes["s"] == first.shapes["s"]  # read from the cache
    load_or_calibrate(STANDIN, 4, *args, path=path)  # other threads: another machine key
    assert calls["samples"] == 2 and len(json.loads(path.read_text())) == 2
    path.write_text("{not json")
    load_or_calibrate(STANDIN, 2, *args, path=path)  # an unreadable cache is measured again
    assert calls["samples"] == 3


# The accelerator tier on the CPU stand-in -------------------------------------------------------------------

@pytest.mark.parametrize("gpu_budget", [None, "25%", 0])
def test_standin_tier_matches_the_cpu_path(package, gpu_budget):
    reference = edge_moe.load(package)
    expected = reference.generate(PROMPT, max_new_tokens=12).token_ids
    model = tier_model(package, gpu_budget=gpu_budget, cost_model=stub(package))
    np.testing.assert_allclose(model.logits(PROMPT), reference.logits(PROMPT), rtol=1e-5, atol=1e-5)
    assert model.generate(PROMPT, max_new_tokens=12).token_ids == expected
    assert model.accelerator.used <= model.accelerator.budget


def test_decisions_follow_the_cost_table(package):
    cheap_upload = stub(package, cpu_ms=(1.0, 50.0), gpu_ms=(0.01, 0.02), upload_ms=0.01)
    model = tier_model(package, gpu_budget=0, cost_model=cheap_upload)
    model.generate(PROMPT, max_new_tokens=4)
    where = {w for entry in model.trace for w in entry["where"]}
    s = model.accelerator.stats
    assert where == {"upload"} and s.cpu_runs == 0 and s.uploads == s.upload_runs > 0 and s.promotions == 0

    model = tier_model(package, gpu_budget=0, cost_model=stub(package, upload_ms=1e3))  # uploads never pay
    model.generate(PROMPT, max_new_tokens=4)
    assert {w for entry in model.trace for w in entry["where"]} == {"cpu"} and model.accelerator.stats.uploads == 0

    model = tier_model(package, cost_model=stub(package))  # every expert fits: uploaded at load, then all hits
    uploads = model.accelerator.stats.uploads
    assert uploads == len(model.manifest.experts)
    result = model.generate(PROMPT, max_new_tokens=4)
    assert {w for entry in model.trace for w in entry["where"]} == {"gpu"}
    assert model.accelerator.stats.uploads == uploads and result.stats["tiers"]["cpu_runs"] == 0


def test_gpu_budget_holds_and_hot_experts_are_promoted(package):
    # an upload costs what 1.7 decode calls save: experts routed to about twice recently are promoted
    model = tier_model(package, gpu_budget="25%", cost_model=stub(package, upload_ms=0.3))
    tier = model.accelerator
    seen = []
    admit = tier._admit

    def checked_admit(key, handle):
        admit(key, handle)
        seen.append(tier.used)
        assert tier.used <= tier.budget

    tier._admit = checked_admit
    model.generate(PROMPT, max_new_tokens=24)
    s = tier.stats
    assert s.promotions > 0 and max(seen) <= tier.budget
    assert 0 < tier.used <= tier.budget and s.gpu_hits > 0 and s.cpu_runs > 0
    assert {k for k, v in tier.snapshot().items() if v == "gpu"} == set(tier.resident)
    assert all(len(e["where"]) == len(e["experts"]) and None not in e["where"] for e in model.trace)
    assert s.upload_bytes == sum(model.manifest.experts[k].length for k in tier.resident) + \
        (s.uploads - len(tier.resident)) * next(iter(model.manifest.experts.values())).length

    # A cold expert routed to often enough overtakes the least-used resident one.
    layer = 0
    cold = next(e for e in range(model.config["num_experts"]) if (layer, e) not in tier.resident)
    for _ in range(50):
        tier.observe_routes(layer, np.array([[cold]]))
    x = np.ones((1, model.config["hidden_size"]), np.float32)
    expert = next(tier.fetch(layer, [cold]))
    evictions = s.evictions
    tier.run(expert, x)
    assert (layer, cold) in tier.resident and s.evictions > evictions and model.trace[-1]["where"] == ["upload"]
    assert next(tier.fetch(layer, [cold])) is tier.resident[(layer, cold)]  # next time: a GPU hit


def test_quantized_experts_stay_on_the_cpu(package, tmp_path):
    hf = package.parent / "hf"
    q4 = export_checkpoint(hf, tmp_path / "q4", bits=4, progress=False)
    reference = edge_moe.load(q4)
    model = edge_moe.load(q4, device=STANDIN, gpu_budget="50%", trace=True, cost_model=CostModel({}))
    np.testing.assert_allclose(model.logits(PROMPT), reference.logits(PROMPT), rtol=1e-5, atol=1e-5)
    assert {w for entry in model.trace for w in entry["where"]} == {"cpu"} and model.accelerator.used == 0
