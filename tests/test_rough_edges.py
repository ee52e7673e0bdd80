"""What a new user hits first: Model's lifecycle and live controls, arguments refused before any work, budgets
clamped with a notice, `default` as a model name, profiles by extension, plan recording its own statistics."""

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest

import edge_moe
from edge_moe.budget import full_budget, minimum_budget
from edge_moe.errors import EdgeMoeError

from test_cli import assert_user_error, cli


@pytest.fixture(scope="module")
def reference_tokens(tiny_package):
    return edge_moe.load(tiny_package[0]).generate([5, 6, 7, 8], max_new_tokens=8).token_ids


def test_pin_is_all_or_nothing(tiny_package, reference_tokens):
    model = edge_moe.load(tiny_package[0], budget=minimum_budget(edge_moe.load(tiny_package[0]).manifest) * 2)
    with pytest.raises(EdgeMoeError, match="no such"):
        model.pin([(0, 0), (7, 99)])
    assert model.experts.pinned == set()
    every = list(model.manifest.experts)
    with pytest.raises(EdgeMoeError, match="pin fewer or raise the budget"):
        model.pin(every)
    assert model.experts.pinned == set()
    assert model.generate([5, 6, 7, 8], max_new_tokens=8).token_ids == reference_tokens  # still generates
    model.pin([(0, 1), (1, 2)])
    assert model.experts.pinned == {(0, 1), (1, 2)}
    assert model.experts.snapshot()[(0, 1)] == "pinned"
    model.unpin([(0, 1)])
    assert model.experts.pinned == {(1, 2)}
    model.unpin()
    assert model.experts.pinned == set()


def test_close_and_context_manager(tiny_package, reference_tokens):
    with edge_moe.load(tiny_package[0], budget="50%") as model:
        assert model.generate([5, 6, 7, 8], max_new_tokens=8).token_ids == reference_tokens
    assert model.closed
    with pytest.raises(EdgeMoeError, match="closed"):
        model.generate([5, 6], max_new_tokens=2)
    with pytest.raises(EdgeMoeError, match="closed"):
        model.logits([5, 6])
    model.close()  # twice is fine


def test_live_budget_and_prefetch_keep_tokens(tiny_package, reference_tokens):
    model = edge_moe.load(tiny_package[0], budget="100%", prefetch=1)
    full = full_budget(model.manifest)
    assert model.set_budget("50%") == full // 2
    assert model.expert_stats()["budget_bytes"] == full // 2 and model.experts.resident_bytes() <= full // 2
    model.set_prefetch(0)
    assert model.forward.predictor is None
    assert model.generate([5, 6, 7, 8], max_new_tokens=8).token_ids == reference_tokens
    model.set_prefetch(1)
    assert model.forward.predictor is not None
    assert model.set_budget(minimum_budget(model.manifest)) == minimum_budget(model.manifest)
    assert model.generate([5, 6, 7, 8], max_new_tokens=8).token_ids == reference_tokens
    with pytest.raises(EdgeMoeError, match="below the minimum"):
        model.set_budget(1000)
    with pytest.raises(EdgeMoeError, match="load it with a budget"):
        edge_moe.load(tiny_package[0]).set_budget("50%")


def test_budget_above_the_model_clamps_with_a_notice(tiny_package, capsys):
    model = edge_moe.load(tiny_package[0], budget="200%")
    assert model.budget == full_budget(model.manifest)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "200%" in lines[0] and "more than all experts need" in lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--threads", "-3"], "--threads -3"),
    (["--prefetch", "-1"], "--prefetch -1"),
    (["--seed", "-1"], "seed -1"),
    (["--top-k", "-2"], "top_k -2"),
    (["--prompt-ids", "1,2"], "either --prompt"),
    (["--gpu-budget", "1GB"], "--device cuda"),
    (["--logprobs", "2"], "--json"),
    (["--trace", "/no/such/dir/t.jsonl"], "/no/such/dir"),
])
def test_generate_refuses_bad_arguments_before_loading(args, needle):
    # the package does not exist: an error about the argument shows it was checked before anything loaded
    assert_user_error(cli("generate", "--model", "/no/such/package", "--prompt", "x", *args), needle)


def test_bench_refuses_a_bad_policy_before_running(tiny_package):
    result = cli("bench", "--model", tiny_package[0], "--budgets", "50%", "--policies", "lru,foo", "--tokens", "2")
    assert_user_error(result, "'foo'")
    assert result.stdout == ""  # no table: nothing ran
    assert_user_error(cli("bench", "--model", tiny_package[0], "--budgets", "abc"), "'abc'")


def test_profile_output_is_checked_first_and_follows_the_extension(tmp_path):
    assert_user_error(cli("profile", "--out", tmp_path / "me.yaml"), ".toml or .json")
    assert_user_error(cli("profile", "--out", tmp_path / "no" / "me.toml"), "does not exist")
    from edge_moe.profiles import PROFILE_DIR, load_profile, write_profile

    data = tomllib.loads((PROFILE_DIR / "rpi5-8gb-microsd.toml").read_text())
    write_profile(data, tmp_path / "me.json")
    write_profile(data, tmp_path / "me.toml")
    assert json.loads((tmp_path / "me.json").read_text()) == data
    from dataclasses import replace

    assert load_profile(tmp_path / "me.json") == replace(load_profile(tmp_path / "me.toml"),
                                                         path=str(tmp_path / "me.json"))


def test_trace_write_failure_is_one_line(tmp_path):
    from edge_moe.files import write_text_atomic

    with pytest.raises(EdgeMoeError, match="cannot write"):
        write_text_atomic(tmp_path / "missing" / "x.txt", "x")


def test_version_and_defaults_in_help():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edge-moe {edge_moe.__version__}"
    text = " ".join(cli("generate", "--help").stdout.split())
    assert "tokens to generate at most (default: 64)" in text
    assert "(default: adaptive)" in text


def test_default_names_the_shipped_model_everywhere(shipped_package):
    env_cache = os.environ["EDGE_MOE_CACHE"]
    result = subprocess.run([sys.executable, "-m", "edge_moe.cli", "inspect", "default", "--json"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "EDGE_MOE_CACHE": env_cache})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(shipped_package)
    assert edge_moe.load("default").manifest.root == shipped_package


def test_plan_records_routing_on_first_use(tiny_package, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_package[0], package)
    result = cli("plan", "--model", package, "--profile", "rpi5-8gb-microsd")
    assert result.returncode == 0, result.stderr
    assert "recording its routing" in result.stderr and "predicted decode" in result.stdout
    assert json.loads((package / "routing_stats.json").read_text())["steps"]


def test_demo_without_a_display_is_one_line():
    pytest.importorskip("PySide6")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    result = subprocess.run([sys.executable, "-m", "edge_moe_demo.main"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert_user_error(result, "no display")
    assert result.returncode == 2


def test_demo_screenshot_with_a_bad_model_fails(tmp_path):
    pytest.importorskip("PySide6")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run([sys.executable, "-m", "edge_moe_demo.main", "--model", tmp_path / "nothing",
                             "--screenshot", tmp_path / "s.png"], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2
    assert "cannot open model" in result.stderr


def test_ctrl_c_while_native_libraries_load_waits_for_the_block_end():
    import signal
    import threading

    from edge_moe.cli import sigint_deferred

    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # held back until the block ends
            time.sleep(0.05)
            reached_end = True
    assert reached_end


def test_cli_module_loads_without_the_runtime():
    code = "import sys, edge_moe.cli; print('onnxruntime' in sys.modules, 'edge_moe.runtime' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"]  # main() imports them with Ctrl-C deferred
