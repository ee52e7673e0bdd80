"""The model that ships with edge_moe: matches transformers, first use is atomic, the cache may be unwritable,
and sampling is reproducible."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import edge_moe
from edge_moe import default_model
from edge_moe.manifest import Manifest

from conftest import reference_logits


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_MOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def default_package(tmp_path_factory):
    os.environ.setdefault("EDGE_MOE_CACHE", str(tmp_path_factory.mktemp("default-cache")))
    return default_model.default_model_path(progress=False)


def test_shipped_checkpoint_matches_transformers(default_package):
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(default_model.shipped_checkpoint(), dtype=torch.float32).eval()
    model = edge_moe.load(default_package)
    ids = model.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    np.testing.assert_allclose(model.logits(ids), reference_logits(reference, ids), atol=1e-4, rtol=0)
    c = model.config
    assert c["num_layers"] >= 8 and c["num_experts"] >= 16 and c["top_k"] >= 2


def test_shipped_files_fit_the_size_limit():
    total = sum(p.stat().st_size for p in default_model.shipped_checkpoint().iterdir() if p.is_file())
    assert total <= 24 * 10**6


def test_load_without_path_uses_the_cache(cache_dir):
    model = edge_moe.load()
    assert cache_dir in model.manifest.root.parents
    again = default_model.default_model_path(progress=False)
    assert again == model.manifest.root  # reused, not exported twice


def test_an_export_by_an_older_exporter_is_not_reused(cache_dir, monkeypatch):
    """Same edge_moe version, a newer exporter revision: the default model is exported again under a new name and
    the new export has what the revision brought (routing inside the layer graphs)."""
    from edge_moe_export import exporter
    from edge_moe_export.families import base

    monkeypatch.setattr(exporter, "REVISION", exporter.REVISION - 1)
    monkeypatch.setattr(base, "routes_in_graph", lambda spec: False)  # what an older exporter wrote
    old = default_model.default_model_path(progress=False)
    assert not edge_moe.load(old).backbone.routed
    monkeypatch.undo()
    monkeypatch.setenv("EDGE_MOE_CACHE", str(cache_dir))
    new = default_model.default_model_path(progress=False)
    assert new != old and f"-x{exporter.REVISION}-" in new.name
    assert edge_moe.load(new).backbone.routed == set(edge_moe.load(new).config["moe_layers"])


def test_killed_first_use_export_is_redone(cache_dir):
    code = "from edge_moe.default_model import default_model_path; default_model_path(progress=False)"
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    deadline = time.time() + 60
    while time.time() < deadline and not list(cache_dir.glob("*.partial-*")):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not [p for p in cache_dir.glob("default-*") if ".partial-" not in p.name], \
        "a killed export must not leave a package directory"
    path = default_model.default_model_path(progress=False)
    Manifest.load(path)
    assert not list(cache_dir.glob("*.partial-*")), "the stale staging directory is cleaned up"


def test_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EDGE_MOE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = default_model.default_model_path(progress=False)
    assert str(path).startswith(str(tmp_path / "tmp"))
    assert "not writable" in capsys.readouterr().err
    Manifest.load(path)


def test_sampling_is_reproducible_with_a_seed(default_package):
    model = edge_moe.load(default_package)
    runs = [model.generate("import os\n", max_new_tokens=24, temperature=0.9, seed=seed).token_ids
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
