"""A package is untrusted input: structural attacks on paths, file types, sizes, records and checksums each end
in one EdgeMoeError naming the file or field (never a traceback, a hang or a read outside the package)."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager

import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe import default_model
from edge_moe.manifest import Manifest, seal
from edge_moe.package_files import file_checksum
from edge_moe.verify import verify_package


@contextmanager
def time_limit(seconds: float):
    """A hang (a blocking FIFO open, an endless read) fails the test instead of stalling the suite."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def pkg(tiny_package, tmp_path):
    """A private copy of the tiny package, given the default model's tokenizer (the tiny checkpoint has none)."""
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package[0], copy)
    shutil.copyfile(default_model.SHIPPED / "tokenizer.json", copy / "tokenizer.json")
    digest = file_checksum(copy / "tokenizer.json")

    def add(d):
        d["tokenizer"] = "tokenizer.json"
        d["files"]["tokenizer.json"] = {"bytes": digest[0], "checksum": digest[1]}

    edit(copy, add)
    return copy


def edit(pkg, change, reseal=True):
    """Applies change(data) to manifest.json; reseal recomputes the digest (an attacker can: it is no signature)."""
    data = json.loads((pkg / "manifest.json").read_text())
    change(data)
    (pkg / "manifest.json").write_text(json.dumps(seal(data) if reseal else data))


def refused(pkg, *words):
    with time_limit(20):
        with pytest.raises(EdgeMoeError) as info:
            edge_moe.load(pkg)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def first_expert(data):
    return data["experts"][0]


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.bin", "experts/../../outside.bin", "", "a\\b"])
def test_paths_outside_the_package(pkg, path):
    (pkg.parent / "outside.bin").write_bytes((pkg / "experts" / "layer_000.bin").read_bytes())
    edit(pkg, lambda d: first_expert(d).__setitem__("blob", path))
    refused(pkg, "experts[0].blob")


@pytest.mark.parametrize("field", ["blob", "embed", "tokenizer"])
def test_symlink_leading_out_is_refused(pkg, field):
    target = {"blob": pkg / "experts" / "layer_000.bin", "embed": pkg / "backbone" / "embed.onnx",
              "tokenizer": pkg / "tokenizer.json"}[field]
    outside = pkg.parent / f"outside-{target.name}"
    shutil.move(target, outside)
    target.symlink_to(outside)  # same bytes, so only the link itself can be the reason
    refused(pkg, "outside the package")


def test_symlink_inside_the_package_loads(pkg):
    target = pkg / "tokenizer.json"
    shutil.move(target, pkg / "tok-real.json")
    target.symlink_to("tok-real.json")
    assert edge_moe.load(pkg).tokenizer.encode("def f")


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json", "backbone/layer_000.onnx",
                                  "experts/layer_001.bin"])
def test_fifo_in_place_of_a_file_never_blocks(pkg, name):
    (pkg / name).unlink()
    os.mkfifo(pkg / name)
    refused(pkg, "FIFO")


@pytest.mark.parametrize("name", ["tokenizer.json", "experts/layer_000.bin"])
def test_device_file_in_place_of_a_file_is_never_read(pkg, name):
    (pkg / name).unlink()
    try:
        os.mknod(pkg / name, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: a read that never ends
    except (OSError, AttributeError):
        pytest.skip("creating device files needs CAP_MKNOD")
    refused(pkg, "character device")


def test_directory_in_place_of_the_tokenizer(pkg):
    (pkg / "tokenizer.json").unlink()
    (pkg / "tokenizer.json").mkdir()
    refused(pkg, "directory")


def test_oversized_manifest_is_refused_before_reading(pkg, monkeypatch):
    monkeypatch.setattr("edge_moe.manifest.MANIFEST_MAX_BYTES", 1000)
    refused(pkg, "limit")


def test_deep_nesting_is_corrupt_json(pkg):
    (pkg / "manifest.json").write_text('{"format_version": 2, "x": ' + "[" * 100000 + "]" * 100000 + "}")
    refused(pkg, "corrupt JSON")


def test_edited_manifest_fails_its_digest(pkg):
    edit(pkg, lambda d: d["config"].__setitem__("top_k", 1), reseal=False)
    refused(pkg, "digest")


@pytest.mark.parametrize("top_k", [-1, 0, 100, 2.0, True, "2"])
def test_top_k_outside_one_to_experts(pkg, top_k):
    edit(pkg, lambda d: d["config"].__setitem__("top_k", top_k))
    refused(pkg, "config.top_k")


@pytest.mark.parametrize("key,value", [("num_experts", 10**9), ("num_layers", 10**6), ("vocab_size", 10**12),
                                       ("head_dim", 60000), ("hidden_size", 2**62)])
def test_huge_counts_are_bounded_by_bytes_present(pkg, key, value):
    edit(pkg, lambda d: d["config"].__setitem__(key, value))
    refused(pkg, key if key not in ("head_dim",) else "head_dim")


def test_duplicate_expert_record(pkg):
    edit(pkg, lambda d: d["experts"].append(dict(d["experts"][3])))
    refused(pkg, "two records")


def test_overlapping_expert_ranges(pkg):
    def overlap(d):
        a, b = d["experts"][0], d["experts"][1]
        b["offset"], b["checksum"] = a["offset"], a["checksum"]

    edit(pkg, overlap)
    refused(pkg, "overlap")


@pytest.mark.parametrize("delta", [1, -1, 4096])
def test_tensor_offset_off_by_some_bytes(pkg, delta):
    edit(pkg, lambda d: first_expert(d)["tensors"][1].__setitem__("offset", first_expert(d)["tensors"][1]["offset"] + delta))
    refused(pkg, "tensor down_proj")


def test_tensor_shape_and_dtype_must_match_the_expert(pkg):
    edit(pkg, lambda d: first_expert(d)["tensors"][0].__setitem__("dtype", "float16"))
    refused(pkg, "gate_up_proj")


def test_router_outside_the_backbone_blob(pkg):
    edit(pkg, lambda d: d["backbone"]["routers"]["0"]["weight"].__setitem__("offset", 10**9))
    refused(pkg, "routers[0]")


def test_graph_of_the_wrong_kind_is_caught_at_load(pkg):
    def swap(d):
        d["backbone"]["layers"][0], d["backbone"]["head"] = d["backbone"]["head"], d["backbone"]["layers"][0]

    edit(pkg, swap)
    refused(pkg, "outputs where the model needs")


@pytest.mark.parametrize("name", ["backbone/weights.bin", "backbone/layer_001.onnx", "tokenizer.json"])
def test_bit_flip_in_backbone_or_tokenizer_fails_the_checksum(pkg, name):
    path = pkg / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    refused(pkg, name.split("/")[-1], "checksum")
    problems, _ = verify_package(pkg)
    assert len(problems) == 1 and name.split("/")[-1] in problems[0]


def test_verify_lists_each_damaged_expert_and_passes_a_clean_package(pkg):
    assert verify_package(pkg)[0] == []
    blob = pkg / "experts" / "layer_001.bin"
    data = bytearray(blob.read_bytes())
    manifest = Manifest.load(pkg)
    damaged = [manifest.experts[(1, 0)], manifest.experts[(1, 4)]]
    for record in damaged:
        data[record.offset + 7] ^= 1
    blob.write_bytes(bytes(data))
    problems, counts = verify_package(pkg)
    assert counts["experts_bad"] == 2 and all("checksum" in p for p in problems)
    assert [p.split("expert ")[1].split(" at")[0] for p in problems] == ["(1, 0)", "(1, 4)"]
    run = subprocess.run([sys.executable, "-m", "edge_moe.cli", "verify", str(pkg)], capture_output=True,
                         text=True)
    assert run.returncode == 1 and run.stdout.count("checksum") == 2 and "Traceback" not in run.stderr


def test_threads_above_the_cpu_count_is_a_clear_error(tiny_package):
    with pytest.raises(EdgeMoeError, match="--threads"):
        edge_moe.load(tiny_package[0], threads=100000)


@pytest.mark.parametrize("options", [{"temperature": float("nan")}, {"top_p": float("nan")}, {"seed": -1}])
def test_sampling_values_that_are_not_numbers(tiny_package, options):
    model = edge_moe.load(tiny_package[0])
    with pytest.raises(EdgeMoeError):
        model.generate([1, 2], max_new_tokens=2, **{"temperature": 0.5, **options})


def test_prompt_that_is_not_utf8(tiny_package):
    run = subprocess.run([sys.executable, "-m", "edge_moe.cli", "generate", "--model", str(tiny_package[0]),
                          "--prompt", os.fsdecode(b"abc\xff\xfe"), "-n", "1"], capture_output=True, text=True)
    assert run.returncode == 2 and "UTF-8" in run.stderr and "Traceback" not in run.stderr


def test_onnxruntime_writes_no_telemetry(tmp_path):
    code = ("import edge_moe, onnxruntime, numpy as np; from onnx import helper, TensorProto as T; "
            "g = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g', "
            "[helper.make_tensor_value_info('x', T.FLOAT, [1])], [helper.make_tensor_value_info('y', T.FLOAT, [1])]); "
            "m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]); m.ir_version = 8; "
            "onnxruntime.InferenceSession(m.SerializeToString()).run(None, {'x': np.ones(1, np.float32)})")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)}, check=True)
    assert not list(tmp_path.rglob("*")), "onnxruntime wrote under HOME"



def test_memory_is_checked_before_loading_every_expert(tiny_package, monkeypatch):
    import psutil
    from types import SimpleNamespace

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))
    with pytest.raises(EdgeMoeError, match="--budget"):
        edge_moe.load(tiny_package[0])


@pytest.mark.parametrize("plant", ["open_mode", "symlink", "file"])
def test_temporary_fallback_must_be_a_private_directory(tmp_path, plant):
    target = tmp_path / "edge_moe-x"
    if plant == "open_mode":
        target.mkdir(mode=0o777)
        target.chmod(0o777)
    elif plant == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.write_text("")
    with pytest.raises(EdgeMoeError, match="private directory"):
        default_model.private_directory(target)
    fresh = default_model.private_directory(tmp_path / "fresh")
    assert (fresh.stat().st_mode & 0o777) == 0o700


def test_atomic_write_replaces_a_planted_link_instead_of_following_it(tmp_path):
    from edge_moe.files import write_text_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "trace.jsonl").symlink_to(victim)
    write_text_atomic(tmp_path / "trace.jsonl", "new")
    assert victim.read_text() == "precious" and (tmp_path / "trace.jsonl").read_text() == "new"
    assert not (tmp_path / "trace.jsonl").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.jsonl", "victim.txt"]
