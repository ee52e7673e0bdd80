"""edge_moe's float16 expert kernel (edge_moe/native): against a float64 numpy oracle of the same experts, and, in
a model, against the per-expert path (onnxruntime over the same float16 weights cast to float32) and transformers."""

import numpy as np
import pytest

import edge_moe
from edge_moe import native
from edge_moe.errors import EdgeMoeError

from conftest import EXPERT_KEY, assert_agrees, export_float16, tiny_config

IDS = [5, 6, 7, 8, 30, 31, 2, 40, 41, 11]


def _cpu_has_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


# Where the CPU has what the kernel needs, the install must have built it: a missing build fails here, not skips
pytestmark = pytest.mark.skipif(not _cpu_has_f16c(), reason="this CPU lacks AVX2/FMA/F16C; the kernel is not used")


def oracle(fc1, fc2, x, indices, weights):
    """The experts in float64, one token and expert at a time."""
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for s, e in enumerate(indices[t]):
            gate_up = fc1[e].astype(np.float64) @ x[t]
            gate, up = gate_up[0::2], gate_up[1::2]
            y[t] += weights[t, s] * (fc2[e].astype(np.float64) @ (gate / (1 + np.exp(-gate)) * up))
    return y


def test_the_kernel_is_built_here():
    assert native.unavailable_reason() is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden,intermediate", [(64, 48), (22, 13)])  # 22: rows past groups of 4, sums past 8s
@pytest.mark.parametrize("tokens", [1, 2, 4, 7, 64])
def test_kernel_equals_the_experts_it_stacks(threads, hidden, intermediate, tokens):
    rng = np.random.default_rng(tokens * 100 + hidden)
    experts, k = 6, 3
    fc1 = (rng.standard_normal((experts, 2 * intermediate, hidden)) * 0.3).astype(np.float16)
    fc2 = (rng.standard_normal((experts, hidden, intermediate)) * 0.3).astype(np.float16)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    # a token meets an expert at most once; some experts get no token at all when tokens are few
    indices = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    weights = rng.random((tokens, k)).astype(np.float32)
    y = native.moe(*native.stacked(fc1, fc2), x, indices, weights, threads)
    expected = oracle(fc1, fc2, x, indices, weights)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


def oracle_one(gate_up, down, x):
    """One expert in the package's layout, float64: gate_up [H, 2F] (gate | up), down [F, H]."""
    f = down.shape[0]
    g = x.astype(np.float64) @ gate_up.astype(np.float64)
    return (g[:, :f] / (1 + np.exp(-g[:, :f])) * g[:, f:]) @ down.astype(np.float64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden,intermediate", [(64, 48), (22, 13), (40, 70)])  # columns past strips of 32 and 8
@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_one_expert_in_the_packages_layout_equals_the_oracle(threads, hidden, intermediate, tokens):
    rng = np.random.default_rng(tokens * 100 + hidden)
    gate_up = (rng.standard_normal((hidden, 2 * intermediate)) * 0.3).astype(np.float16)
    down = (rng.standard_normal((intermediate, hidden)) * 0.3).astype(np.float16)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    y = native.expert_f16(gate_up, down, x, threads)
    expected = oracle_one(gate_up, down, x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.array_equal(y, native.expert_f16(gate_up, down, x, 3 - threads))  # the thread count changes no bit


def test_kernel_refuses_what_it_cannot_read():
    fc1, fc2 = np.zeros((2, 8, 8), np.float16), np.zeros((2, 8, 4), np.float16)
    x, w = np.zeros((1, 8), np.float32), np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match="outside"):
        native.moe(*native.stacked(fc1, fc2), x, np.array([[2]]), w)
    with pytest.raises(ValueError, match="C-contiguous float16/float32"):
        native.stacked(fc1.astype(np.int8), fc2)
    with pytest.raises(ValueError, match="are not"):
        native.moe(*native.stacked(np.zeros((2, 6, 8), np.float16), fc2), x, np.array([[1]]), w)
    with pytest.raises(ValueError, match="do not match"):
        native.moe(*native.stacked(fc1, fc2), np.zeros((2, 8), np.float32), np.array([[1]]), w)
    gate_up, down = np.zeros((8, 6), np.float16), np.zeros((3, 8), np.float16)
    with pytest.raises(ValueError, match="do not match"):
        native.expert_f16(gate_up, down, np.zeros((1, 7), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        native.head(np.ones(8, np.float32), 1e-6, native.Matrix.of_rows(np.zeros((5, 8), np.float16)),
                    np.zeros((1, 6), np.float32))


FUSABLE = sorted(set(EXPERT_KEY) - {"gpt_oss"})  # GPT-OSS's clamped, biased SwiGLU is not the kernel's


def family_config(family):
    extra = {"kv_heads": 4} if family.startswith("deepseek") else {}
    if family == "deepseek_v3":
        extra.update(n_group=2, topk_group=1, first_k_dense_replace=0, norm_topk_prob=True, routed_scaling_factor=2.5)
    return tiny_config(family, experts=8, top_k=2 if family == "phimoe" else 3, ffn=44, **extra)


@pytest.fixture(scope="module", params=FUSABLE)
def float16_package(request, tmp_path_factory):
    return (request.param, *export_float16(tmp_path_factory.mktemp(request.param), family_config(request.param)))


@pytest.fixture(scope="module")
def qwen3_float16(tmp_path_factory):
    return export_float16(tmp_path_factory.mktemp("qwen3"), family_config("qwen3_moe"))[1]


def test_float16_experts_fuse_in_the_kernel_by_default_and_compute_what_their_experts_do(float16_package):
    family, hf, package = float16_package
    fused = edge_moe.load(package)
    assert fused.fused is not None and fused.fused.native and fused.step_graph is None
    assert fused.fused.nbytes == fused.manifest.expert_bytes  # the float16 bytes, not a float32 copy
    assert_agrees(fused, edge_moe.load(package, fused_moe=False), hf, IDS)
    # one kernel call a MoE layer (outside onnxruntime) beside embed, the layer graphs and the head
    calls, natives = fused.clock.calls, fused.clock.native_calls
    fused.generate(IDS[:3], 2)
    moe_layers = len(fused.config["moe_layers"])
    assert fused.clock.native_calls - natives == 2 * moe_layers
    assert fused.clock.calls - calls == 2 * (2 + fused.config["num_layers"] + moe_layers)


def test_two_threads_and_onnxruntimes_float32_stacks_give_the_same_tokens(qwen3_float16):
    package = qwen3_float16
    one = edge_moe.load(package)
    two = edge_moe.load(package, threads=2)
    stacks = edge_moe.load(package, fused_moe=True, native_kernel=False)
    assert two.fused.native and two.fused.threads == 2
    assert not stacks.fused.native and stacks.fused.dtype == "float32"
    a = one.logits(IDS)
    scale = np.abs(a).max()
    assert np.abs(two.logits(IDS) - a).max() <= 1e-5 * scale
    assert np.abs(stacks.logits(IDS) - a).max() <= 1e-5 * scale
    assert one.generate(IDS, 10).token_ids == two.generate(IDS, 10).token_ids == stacks.generate(IDS, 10).token_ids


def test_a_budget_or_a_missing_kernel_keeps_float16_experts_one_by_one(qwen3_float16, monkeypatch):
    package = qwen3_float16
    assert edge_moe.load(package, budget="60%").fused is None
    assert edge_moe.load(package, native_kernel=False).fused is None  # float32 stacks only when asked for
    monkeypatch.setattr(native, "unavailable_reason", lambda: "edge_moe's kernels were not built")
    assert edge_moe.load(package).fused is None
    with pytest.raises(EdgeMoeError, match="kernel cannot run these experts: edge_moe's kernels were not built"):
        edge_moe.load(package, fused_moe=True, native_kernel=True)


def test_streamed_float16_experts_run_in_the_kernel_one_by_one(float16_package):
    """Under a budget the cache's experts (views of their read buffers, the package's layout) run in the kernel one
    call each: the logits and tokens of onnxruntime's per-expert graphs, and transformers'."""
    family, hf, package = float16_package
    budgeted = edge_moe.load(package, budget="50%")
    graphs = edge_moe.load(package, budget="50%", native_kernel=False)
    assert budgeted.fused is None and budgeted.kernels.native_threads and graphs.kernels.native_threads is None
    natives = budgeted.clock.native_calls
    assert_agrees(budgeted, graphs, hf, IDS)
    assert budgeted.clock.native_calls > natives and graphs.clock.native_calls == 0
