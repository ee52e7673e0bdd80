"""The CLI end to end, and bad input: one line naming the file or value, a non-zero exit, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_moe.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_user_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_generate_json_matches_python_api(tiny_package):
    import edge_moe

    package, _ = tiny_package
    result = cli("generate", "--model", package, "--prompt-ids", "5,6,7,8", "-n", "6", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["token_ids"] == edge_moe.load(package).generate([5, 6, 7, 8], max_new_tokens=6).token_ids
    assert out["stats"]["generated_tokens"] == len(out["token_ids"])


def test_inspect(tiny_package):
    package, _ = tiny_package
    result = cli("inspect", package, "--json")
    summary = json.loads(result.stdout)
    assert summary["family"] == "qwen3_moe" and summary["experts"] == 12 and summary["expert_bytes"] > 0


@pytest.fixture
def broken(tiny_package, tmp_path):
    """A private copy of the package to damage."""
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package[0], copy)
    return copy


def test_missing_manifest(broken):
    (broken / "manifest.json").unlink()
    assert_user_error(cli("generate", "--model", broken, "--prompt-ids", "1"), "manifest.json", "export")


def test_corrupt_manifest(broken):
    (broken / "manifest.json").write_text("{not json")
    assert_user_error(cli("inspect", broken), "manifest.json", "corrupt")


def test_unknown_format_version(broken):
    data = json.loads((broken / "manifest.json").read_text())
    data["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(data))
    assert_user_error(cli("inspect", broken), "format_version 99")


def test_missing_expert_blob(broken):
    (broken / "experts" / "layer_001.bin").unlink()
    assert_user_error(cli("generate", "--model", broken, "--prompt-ids", "1"), "layer_001.bin", "missing")


def test_truncated_expert_blob(broken):
    blob = broken / "experts" / "layer_000.bin"
    blob.write_bytes(blob.read_bytes()[:5000])
    assert_user_error(cli("generate", "--model", broken, "--prompt-ids", "1"), "layer_000.bin", "truncated")


def test_checksum_mismatch(broken):
    blob = broken / "experts" / "layer_000.bin"
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert_user_error(cli("generate", "--model", broken, "--prompt-ids", "1"), "layer_000.bin", "checksum")


@pytest.mark.parametrize("args, needle", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt-ids", ""], "prompt is empty"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--prompt-ids", "1,100000"], "token id 100000"),
    (["--prompt-ids", "1", "-n", "0"], "-n 0"),
    (["--prompt", "hello"], "no tokenizer"),
    (["--prompt-ids", "1", "--top-p", "0"], "top_p"),
])
def test_bad_generate_input(tiny_package, args, needle):
    assert_user_error(cli("generate", "--model", tiny_package[0], *args), needle)


def test_export_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_user_error(cli("export", tmp_path, tmp_path / "out"), "gpt2", "qwen3_moe")
