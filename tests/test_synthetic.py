"""Synthetic checkpoints: transformers loads them as its own, shards/dtypes are exact, writing streams, and the
router structure (skewed popularity, layer-to-layer correlation) is really there."""
import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge_moe.errors import EdgeMoeError
from edge_moe_export.safetensors_writer import to_bfloat16_bits
from edge_moe_export.synthetic import main, write_synthetic_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402  (comes with transformers)

FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "granitemoe", "phimoe", "gpt_oss"]
TINY = dict(hidden_size=64, num_layers=2, num_experts=8, top_k=2, moe_intermediate_size=32, vocab_size=128,
            num_attention_heads=4, num_key_value_heads=2, progress=False)


def _tensors(ckpt, framework="np"):
    """{name: array} of every shard named by the index."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(ckpt / shard, framework) as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _shapes(ckpt, pattern):
    shapes = {}
    for path in ckpt.glob(pattern):
        with safe_open(path, "np") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


SMALL_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=48,
                 n_shared_experts=1)
FAMILY_CONFIG = {"deepseek_v2": dict(SMALL_MLA, n_group=4, topk_group=2),
                 "deepseek_v3": dict(SMALL_MLA, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.0)}


@pytest.mark.parametrize("family", FAMILIES + sorted(FAMILY_CONFIG))
def test_family_is_what_transformers_writes(family, tmp_path):
    extra = dict(num_key_value_heads=4, family_config=FAMILY_CONFIG[family]) if family in FAMILY_CONFIG else {}
    ckpt = write_synthetic_checkpoint(tmp_path / "ck", family=family, **{**TINY, **extra})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}          # no missing, unexpected or mismatched keys

    # Same tensor names and shapes, same config.json, as transformers' own save of this config.
    ref = tmp_path / "ref"
    config = transformers.AutoConfig.from_pretrained(ckpt)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(ref)
    assert _shapes(ckpt, "model-*.safetensors") == _shapes(ref, "*.safetensors")
    ours, theirs = json.loads((ckpt / "config.json").read_text()), json.loads((ref / "config.json").read_text())
    theirs.pop("transformers_version")
    assert ours == theirs

    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 12))).logits
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10


@pytest.mark.parametrize("family", ["granitemoe", "phimoe", "gpt_oss"])
def test_new_family_synth_exports_to_transformers_logits(family, tmp_path):
    """The fused experts (Granite, GPT-OSS), LayerNorm and biases (Phi), sinks and router biases (GPT-OSS) of a
    synthetic checkpoint are what edge_moe's families read: the export computes transformers' logits."""
    import edge_moe
    from edge_moe_export.exporter import export_checkpoint

    ckpt = write_synthetic_checkpoint(tmp_path / "ck", family=family, **TINY)
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = list(range(3, 15))
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    got = edge_moe.load(export_checkpoint(ckpt, tmp_path / "pkg", progress=False)).logits(ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_multi_shard_index(tmp_path):
    one = write_synthetic_checkpoint(tmp_path / "one", family="qwen2_moe", **TINY)
    many = write_synthetic_checkpoint(tmp_path / "many", family="qwen2_moe", shard_bytes=64 * 1024, **TINY)
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [p.name for p in one.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]

    index = json.loads((many / "model.safetensors.index.json").read_text())
    data_bytes = 0
    for shard in shards:                 # raw format: u64 header length, JSON padded to 8, contiguous data
        raw = (many / shard).read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + hlen])
        assert hlen % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        spans = sorted(v["data_offsets"] for v in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(raw) == 8 + hlen + spans[-1][1]
        assert all(index["weight_map"][k] == shard for k in header)
        data_bytes += spans[-1][1]
    assert index["metadata"]["total_size"] == data_bytes
    assert data_bytes == sum(v.nbytes for v in _tensors(many).values())

    a, b = _tensors(one), _tensors(many)   # the shard layout does not change any value
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_half_precision_matches_numpy_and_torch(tmp_path):
    f32 = _tensors(write_synthetic_checkpoint(tmp_path / "f32", **TINY))
    f16 = _tensors(write_synthetic_checkpoint(tmp_path / "f16", dtype="float16", **TINY))
    bf16 = _tensors(write_synthetic_checkpoint(tmp_path / "bf16", dtype="bfloat16", **TINY), "pt")
    for k, v in f32.items():
        assert f16[k].dtype == np.float16 and np.array_equal(f16[k], v.astype(np.float16)), k
        assert bf16[k].dtype == torch.bfloat16
        assert torch.equal(bf16[k], torch.from_numpy(v).to(torch.bfloat16)), k   # torch rounds to nearest even

    # Ties, carries into the exponent, subnormals, infinities and NaN, bit for bit against torch.
    edge = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 3.4e38, 1e-40,
                     -0.0, np.inf, -np.inf, 255.5, 65504.0], dtype=np.float32)
    edge = np.concatenate([edge, np.random.default_rng(0).standard_normal(1000, dtype=np.float32) * 1e3])
    want = torch.from_numpy(edge).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bfloat16_bits(edge), want)
    nan = to_bfloat16_bits(np.array([np.nan], dtype=np.float32))
    assert torch.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16)).all()


def test_write_is_atomic_and_refuses_existing_dir(tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeMoeError, match=str(out)):
        write_synthetic_checkpoint(out, **TINY)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

    assert main([str(out), "--preset", "tiny", "--quiet"]) == 1          # CLI: one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err

    assert main([str(out), "--preset", "tiny", "--layers", "3", "--quiet", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]           # no .partial- or .old- leftovers

    with pytest.raises(EdgeMoeError, match="head_dim"):
        write_synthetic_checkpoint(tmp_path / "bad", family="olmoe", head_dim=32, **TINY)
    with pytest.raises(EdgeMoeError, match="top_k=9"):
        write_synthetic_checkpoint(tmp_path / "bad", **{**TINY, "top_k": 9})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_writing_streams_with_small_peak_rss(tmp_path):
    # ~216 MB fp32 (two layers of 32 experts of 3 MB); the largest tensor is 1 MB. A fresh process, so the
    # peak RSS (ru_maxrss) is this write's own.
    script = textwrap.dedent(f"""
        import resource
        from edge_moe_export.synthetic import write_synthetic_checkpoint
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_synthetic_checkpoint({str(tmp_path / 'big')!r}, hidden_size=512, num_layers=2, num_experts=32,
                                   moe_intermediate_size=512, vocab_size=2000, progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert written > 200e6
    assert int(done.stdout) < 100e6, f"peak RSS grew by {int(done.stdout) / 1e6:.0f} MB writing {written / 1e6:.0f} MB"


def _routing_stats(path, **kw):
    """Mean normalised entropy of expert popularity (top-k picks) over layers, and the mean rate at which
    layer l+1's top-1 is P[layer l's top-1] (P from synthetic.json) next to what independent layers with the
    same popularity would give."""
    E, k = 16, 2
    ckpt = write_synthetic_checkpoint(path, hidden_size=128, num_layers=4, num_experts=E, top_k=k,
                                      moe_intermediate_size=64, vocab_size=1024, num_attention_heads=4,
                                      num_key_value_heads=2, progress=False, **kw)
    perm = np.array(json.loads((ckpt / "synthetic.json").read_text())["layer_permutation"])
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [r.float().numpy() for r in model(ids, output_router_logits=True).router_logits]
    entropy = []
    for lg in logits:
        p = np.bincount(np.argsort(-lg, axis=1)[:, :k].ravel(), minlength=E) / (lg.shape[0] * k)
        entropy.append(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(E))
    hit, chance = [], []
    for a, b in zip(logits, logits[1:]):
        t1, t2 = a.argmax(1), b.argmax(1)
        p1, p2 = np.bincount(t1, minlength=E) / len(t1), np.bincount(t2, minlength=E) / len(t2)
        hit.append((perm[t1] == t2).mean())
        chance.append((p1 * p2[perm]).sum())
    return np.mean(entropy), np.mean(hit), np.mean(chance)


def test_router_structure_is_skewed_and_correlated(tmp_path):
    # Measured (seeds 0, 1): skewed entropy ~0.75, hit ~0.45 vs chance ~0.22; plain entropy ~0.94, hit = chance.
    entropy, hit, chance = _routing_stats(tmp_path / "skewed", popularity_skew=1.0, layer_correlation=0.6)
    assert entropy < 0.85 and hit > chance + 0.12 and hit > 0.3
    entropy, hit, chance = _routing_stats(tmp_path / "plain", popularity_skew=0.0, layer_correlation=0.0)
    assert entropy > 0.88 and hit < chance + 0.05
