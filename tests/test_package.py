"""The package format: standalone expert graphs, alignment, checksums, atomic export, unknown families."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import xxhash

from edge_moe.errors import EdgeMoeError
from edge_moe.manifest import Manifest
from edge_moe_export import exporter
from edge_moe_export.checkpoint import Checkpoint
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, tiny_config


def test_expert_graph_is_standalone_and_matches_checkpoint(tiny_package):
    package, hf = tiny_package
    manifest = Manifest.load(package)
    checkpoint = Checkpoint(hf)
    x = np.random.default_rng(0).standard_normal((5, manifest.config["hidden_size"])).astype(np.float32)
    for key in [(0, 0), (1, 5)]:
        record = manifest.experts[key]
        assert record.offset % 4096 == 0
        blob = record.blob.read_bytes()
        assert len(blob) % 4096 == 0
        span = blob[record.offset:record.offset + record.length]
        assert record.checksum == "xxh3_64:" + xxhash.xxh3_64_hexdigest(span, seed=(key[0] << 32) | key[1])
        session = ort.InferenceSession(str(record.graph), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"hidden_states": x})
        prefix = f"model.layers.{key[0]}.mlp.experts.{key[1]}"
        gate, up, down = (checkpoint.read(f"{prefix}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj"))
        g = x @ gate.T
        expected = ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T
        np.testing.assert_allclose(y, expected, atol=1e-5)


def test_manifest_lists_every_expert(tiny_package):
    package, _ = tiny_package
    data = json.loads((package / "manifest.json").read_text())
    c = data["config"]
    keys = {(e["layer"], e["index"]) for e in data["experts"]}
    assert keys == {(layer, e) for layer in c["moe_layers"] for e in range(c["num_experts"])}
    assert data["format_version"] == 2 and data["family"] == "qwen3_moe"


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EdgeMoeError, match="supported: deepseek_v2, deepseek_v3, gpt_oss, granitemoe, granitemoeshared, "
                                           "mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe$"):
        export_checkpoint(tmp_path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("rope", [{"rope_type": "longrope", "rope_theta": 1e4}, {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling_names_the_supported(tmp_path, rope):
    config = tiny_config("deepseek_v2", kv_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                         v_head_dim=4).to_dict()
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    with pytest.raises(EdgeMoeError, match=r"^config.json: rope_type '(longrope|dynamic)' is not supported yet; "
                                           r"supported: default, yarn$"):
        export_checkpoint(tmp_path, tmp_path / "out", progress=False)


def test_bad_router_settings_name_the_field(tmp_path):
    config = tiny_config("deepseek_v3", kv_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                         v_head_dim=4, experts=6, n_group=4, topk_group=2).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeMoeError, match=r"^config.json: n_group=4 must divide num_experts=6$"):
        export_checkpoint(tmp_path, tmp_path / "out", progress=False)


def test_interrupted_export_leaves_nothing_loadable(tmp_path, monkeypatch):
    build_checkpoint(tmp_path / "hf", tiny_config("mixtral"))
    calls = {"n": 0}
    real_read = Checkpoint.read

    def failing_read(self, name):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # what Ctrl-C does halfway through
        return real_read(self, name)

    monkeypatch.setattr(Checkpoint, "read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    assert not (tmp_path / "pkg").exists()
    assert not list(tmp_path.glob("pkg*")), "the staging directory must be removed"


def test_existing_directory_needs_overwrite(tmp_path):
    build_checkpoint(tmp_path / "hf", tiny_config("mixtral"))
    export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    with pytest.raises(EdgeMoeError, match="--overwrite"):
        export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False, overwrite=True)
    Manifest.load(tmp_path / "pkg")


def test_bad_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(EdgeMoeError, match="float32, float16"):
        exporter.export_checkpoint(tmp_path, tmp_path / "o", dtype="int3", progress=False)


def test_output_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    build_checkpoint(tmp_path / "hf", tiny_config("mixtral"))
    (tmp_path / "pkg").write_text("not a package")
    with pytest.raises(EdgeMoeError, match="not a directory"):
        export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False, overwrite=True)
    assert (tmp_path / "pkg").read_text() == "not a package"


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["config"]["router"].update(n_group=3), r"config.router: n_group=3 must divide num_experts=8"),
    (lambda m: m["config"]["router"].update(top_k=3), r"config.router has 8 experts, top-3"),
    (lambda m: m["config"]["attention"].update(kind="mqa"), r"config.attention: kind='mqa' is not supported"),
    (lambda m: m["backbone"]["routers"]["0"]["selection_bias"].update(nbytes=4), r"selection_bias: 4 bytes"),
])
def test_damaged_family_records_are_one_line_errors_at_load(tmp_path, damage, words):
    """The router and attention records and the router's selection bias are checked when a package loads."""
    import edge_moe
    from edge_moe.manifest import seal

    config = tiny_config("deepseek_v3", kv_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                         v_head_dim=4, experts=8, n_group=4, topk_group=2, first_k_dense_replace=0, layers=1)
    build_checkpoint(tmp_path / "hf", config)
    package = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    path = package / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(EdgeMoeError, match=words) as info:
        edge_moe.load(package)
    assert "\n" not in str(info.value)
