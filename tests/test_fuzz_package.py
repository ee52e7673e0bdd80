"""Property-based manifest mutations: whatever a mutated manifest.json says, loading it ends in one EdgeMoeError
or in a model that computes exactly what the untouched package computes; never a traceback, a hang, a silently
different output or a path outside the package.

CI runs a modest number of cases; by hand, with outcome counts by category:
    EDGE_MOE_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -q -s tests/test_fuzz_package.py
"""

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_moe.errors import EdgeMoeError
from edge_moe.manifest import Manifest, seal
from edge_moe.runtime import Model

from test_untrusted_package import time_limit

EXAMPLES = int(os.environ.get("EDGE_MOE_FUZZ_EXAMPLES", "120"))
IDS = [3, 5, 7, 11]
MODEL_DEFINING = ("top_k", "norm_topk_prob")
INTERESTING = [None, True, False, 0, 1, -1, 2, 7, 4096, 4095, 2**31, 2**63, -2**63, 10**30, 1.5, -0.0, 1e308, "",
               "x", "../outside.bin", "/etc/passwd", "experts/../../outside.bin", "backbone/head.onnx",
               "experts/layer_000.bin", "manifest.json", "/dev/zero", "float16", "q4", "swiglu",
               "xxh3_64:0000000000000000", [], {}, [0], [1, 2], {"a": 1}, "\udcff", "a" * 5000]


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _paths(value, prefix=()):
    """Every JSON path (containers and leaves), except inside source_config (kept verbatim, never read)."""
    yield prefix
    if prefix == ("source_config",):
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def _parent(data, path):
    for key in path[:-1]:
        data = data[key]
    return data


def _mutate(data, path, kind, value, other):
    if not path:
        return value if kind == "replace" else data
    parent, key = _parent(data, path), path[-1]
    if kind == "replace":
        parent[key] = value
    elif kind == "delete":
        del parent[key]
    elif kind == "duplicate" and isinstance(parent, list):
        parent.append(json.loads(json.dumps(parent[key])))
    elif kind == "swap":
        other_parent = _parent(data, other)
        parent[key], other_parent[other[-1]] = other_parent[other[-1]], parent[key]
    return data


def _semantics(manifest):
    data = manifest.to_json()
    for harmless in ("edge_moe_version", "source_config", "quantization", "digest"):
        data.pop(harmless, None)
    return data


@pytest.fixture(scope="module")
def subject(tiny_package, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    pkg = root / "pkg"
    shutil.copytree(tiny_package[0], pkg)
    # a blob outside the package with the right bytes: a path that escaped confinement would load and run
    shutil.copyfile(pkg / "experts" / "layer_000.bin", root / "outside.bin")
    original = json.loads((pkg / "manifest.json").read_text())
    manifest = Manifest.load(pkg)
    logits = Model(manifest).logits(IDS)
    return pkg, original, list(_paths(original)), _semantics(manifest), logits


def classify(pkg, data, reference, logits) -> str:
    """One case's outcome: refused | accepted-same | accepted-same-output | accepted-other-model | refused-at-run,
    or a failure category (traceback:<type>, hang, outside, different)."""
    try:
        text = json.dumps(data)
    except (ValueError, RecursionError):
        return "unwritable"
    (pkg / "manifest.json").write_text(text, errors="surrogatepass")
    try:
        with time_limit(15):
            manifest = Manifest.load(pkg)
            files = [*manifest.backbone_files, *(p for r in manifest.experts.values() for p in (r.graph, r.blob))]
            if any(manifest.root not in p.parents for p in files):
                return "outside"
            if _semantics(manifest) == reference:
                return "accepted-same"
            try:
                output = Model(manifest).logits(IDS)
            except EdgeMoeError:
                return "refused-at-run"
    except EdgeMoeError as exc:
        return "refused" if "\n" not in str(exc) else "traceback:multiline-error"
    except TimeoutError:
        return "hang"
    except Exception as exc:  # what the test exists to find
        return f"traceback:{type(exc).__name__}:{str(exc)[:120]}"
    if np.array_equal(output, logits):
        return "accepted-same-output"
    # top_k and norm_topk_prob define the model as much as its weights: another valid value is another model, which
    # a re-sealed manifest may legitimately describe; any other change of output is silent damage
    edited = _semantics(manifest)
    edited["config"] = {**edited["config"], **{k: reference["config"][k] for k in MODEL_DEFINING}}
    return "accepted-other-model" if edited == reference else "different"


OUTCOMES: Counter = Counter()


def test_mutated_manifests_are_refused_or_harmless(subject):
    pkg, original, paths, reference, logits = subject
    values = st.one_of(st.sampled_from(INTERESTING), st.integers(-2**70, 2**70), st.text(max_size=12),
                       st.integers(1, 120).map(_nested))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 500, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(paths) - 1), st.sampled_from(["replace"] * 4 + ["delete", "duplicate", "swap"]),
           values, st.integers(0, len(paths) - 1), st.integers(0, 9), st.integers(1, 3))
    def case(which, kind, value, other, reseal, count):
        data = json.loads(json.dumps(original))
        for step in range(count if kind == "replace" else 1):
            path = paths[(which + 7919 * step) % len(paths)]
            try:
                data = _mutate(data, path, kind, value, paths[other])
            except (KeyError, IndexError, TypeError):  # an earlier step removed this path's parent
                pass
        if reseal:  # 9 cases in 10 re-seal the digest, as an attacker would, so the validation itself is tried
            data = seal(data) if isinstance(data, dict) else data
        outcome = classify(pkg, data, reference, logits)
        OUTCOMES[outcome.split(":")[0]] += 1
        assert outcome.split(":")[0] not in ("traceback", "hang", "outside", "different"), outcome

    try:
        case()
    finally:
        (pkg / "manifest.json").write_text(json.dumps(original))
        print(f"\nfuzz outcomes over {sum(OUTCOMES.values())} cases: {dict(sorted(OUTCOMES.items()))}")
    assert OUTCOMES["refused"] > 0 and OUTCOMES["accepted-same"] + OUTCOMES["accepted-same-output"] > 0
