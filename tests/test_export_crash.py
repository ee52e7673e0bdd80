"""kill -9 of `edge-moe export --overwrite` at many points (a subprocess that kills itself just before or after
the Nth call of a step): the package is always the old one or the new one, loads, and the next export cleans
up whatever the killed one left."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from edge_moe.manifest import Manifest
from edge_moe_export.exporter import export_checkpoint
from edge_moe_export.writer import recover_leftovers

CHILD = """
import os, signal, sys
from edge_moe_export import writer, exporter
hf, out, step, nth, when, atomic = sys.argv[1:7]
owner = writer.BlobWriter if step == "write" else writer.os if step == "replace" else writer
real, calls = getattr(owner, step), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if calls[0] == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, step, wrapped)
if atomic == "no":  # a system without renameat2: the two-rename fallback
    writer.exchange = lambda a, b: False
exporter.export_checkpoint(hf, out, overwrite=True, progress=False, dtype="float16")
"""

# (step, nth call, before/after): during the blob writes, at the fsync, with the old package marked, around the
# atomic exchange, around removing the old package
KILL_POINTS = [("write", 1, "before"), ("write", 25, "before"), ("fsync_tree", 1, "before"),
               ("fsync_tree", 1, "after"), ("write_marker", 2, "after"), ("exchange", 1, "before"),
               ("exchange", 1, "after"), ("_remove", 1, "before"), ("_remove", 1, "after"),
               ("replace", 1, "before"), ("replace", 1, "after")]


def digest(package) -> str:
    return json.loads((package / "manifest.json").read_text())["digest"]


@pytest.fixture(scope="module")
def versions(tiny_package, tmp_path_factory):
    """(hf dir, old float32 package, digest of the new float16 export)."""
    root = tmp_path_factory.mktemp("crash")
    new = export_checkpoint(tiny_package[1], root / "new", progress=False, dtype="float16")
    return tiny_package[1], tiny_package[0], digest(new)


def kill_export(hf, pkg, step, nth, when, atomic="yes"):
    run = subprocess.run([sys.executable, "-c", CHILD, str(hf), str(pkg), step, str(nth), when, atomic],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]


def leftovers(pkg):
    return sorted(p.name for p in pkg.parent.iterdir() if p.name != pkg.name and pkg.name in p.name)


@pytest.mark.parametrize("step,nth,when", KILL_POINTS)
def test_killed_overwrite_leaves_old_or_new(versions, tmp_path, step, nth, when):
    hf, old, new_digest = versions
    pkg = tmp_path / "pkg"
    shutil.copytree(old, pkg)
    kill_export(hf, pkg, step, nth, when)
    assert digest(pkg) in (digest(old), new_digest)
    Manifest.load(pkg)
    export_checkpoint(hf, pkg, overwrite=True, progress=False, dtype="float16")
    assert digest(pkg) == new_digest and leftovers(pkg) == []


def test_without_atomic_exchange_the_next_run_restores_the_old_package(versions, tmp_path):
    hf, old, _ = versions
    pkg = tmp_path / "pkg"
    shutil.copytree(old, pkg)
    # os.replace calls: 1 the staging marker, 2 manifest.json, 3 the old package's marker, 4 the old package
    # aside, 5 the new one in: killed after 4, the name is empty until the next run
    kill_export(hf, pkg, "replace", 4, "after", atomic="no")
    assert not pkg.exists()
    recover_leftovers(pkg)
    assert digest(pkg) == digest(old) and leftovers(pkg) == []


def test_a_users_folder_that_looks_like_a_leftover_is_kept(versions, tmp_path):
    hf, old, _ = versions
    mine = tmp_path / "pkg.partial-999999"  # no marker: not edge_moe's, whatever its name says
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    export_checkpoint(hf, tmp_path / "pkg", progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"


# os.replace calls of a first export: 1 the staging marker, 2 manifest.json, 3 the package into its name
@pytest.mark.parametrize("step,nth,when", [("write", 10, "before"), ("replace", 2, "after"), ("replace", 3, "after")])
def test_killed_first_export_leaves_nothing_or_the_whole_package(versions, tmp_path, step, nth, when):
    hf, _, new_digest = versions
    pkg = tmp_path / "pkg"
    kill_export(hf, pkg, step, nth, when)
    assert pkg.exists() == (nth == 3 and step == "replace")
    if pkg.exists():
        assert digest(pkg) == new_digest
        Manifest.load(pkg)
    export_checkpoint(hf, pkg, progress=False, dtype="float16", overwrite=True)
    assert digest(pkg) == new_digest and leftovers(pkg) == []
