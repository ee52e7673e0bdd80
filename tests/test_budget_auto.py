"""`budget="auto"`: the cgroup arithmetic on fake cgroup trees, and the whole path under a real memory cgroup
(where this machine lets the test create one) and from available RAM."""

import pytest

import edge_moe
from edge_moe import memory_limits
from edge_moe.budget import full_budget, kv_bytes_per_token, minimum_budget
from edge_moe.emulate import memory_limit
from edge_moe.errors import EdgeMoeError
from edge_moe.manifest import Manifest

MiB = 2**20


def _write(directory, **files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text)


def test_v2_headroom_discounts_unmapped_file_cache_and_takes_the_tightest_ancestor(tmp_path):
    parent, child = tmp_path / "a", tmp_path / "a" / "b"
    _write(parent, memory__max=str(300 * MiB), memory__current=str(250 * MiB), memory__stat="file 0\n")
    _write(child, memory__max=str(200 * MiB), memory__current=str(150 * MiB),
           memory__stat=f"anon 1\nfile {50 * MiB}\nfile_mapped {10 * MiB}\n")
    # child: 200 - (150 - (50 - 10)) = 90 MiB; parent: 300 - 250 = 50 MiB -> the parent binds
    assert memory_limits._cgroup_headroom("v2", child) == 50 * MiB
    _write(parent, memory__max="max", memory__current="0", memory__stat="")
    assert memory_limits._cgroup_headroom("v2", child) == 90 * MiB


def test_v1_without_a_limit_has_no_headroom_figure(tmp_path):
    _write(tmp_path / "g", memory__limit_in_bytes=str(2**63 - 4096), memory__usage_in_bytes="1000",
           memory__stat="total_cache 0\n")
    assert memory_limits._cgroup_headroom("v1", tmp_path / "g") is None


def test_auto_budget_reserves_kv_and_slack():
    headroom = memory_limits.Headroom(500 * MiB, "test")
    budget, note = memory_limits.auto_budget_bytes(1000, context=4096, headroom=headroom)
    assert budget == 500 * MiB - 1000 * 512 - 24 * MiB
    assert "KV cache of 512 tokens" in note and "test" in note
    budget, _ = memory_limits.auto_budget_bytes(1000, context=100, headroom=headroom)
    assert budget == 500 * MiB - 1000 * 100 - 24 * MiB


def test_auto_from_available_ram_keeps_every_expert_when_they_fit(tiny_package, monkeypatch):
    package, _ = tiny_package
    monkeypatch.setattr(memory_limits, "cgroup_dirs", lambda: [])
    model = edge_moe.load(package, budget="auto")
    assert model.budget == full_budget(model.manifest) and "available RAM" in model.budget_note
    assert len(model.generate([3, 4, 5], max_new_tokens=4).token_ids) == 4


def test_auto_below_the_minimum_is_a_clear_error(tiny_package, monkeypatch):
    package, _ = tiny_package
    monkeypatch.setattr(memory_limits, "memory_headroom", lambda: memory_limits.Headroom(24 * MiB, "a tiny box"))
    with pytest.raises(EdgeMoeError, match="below the minimum"):
        edge_moe.load(package, budget="auto")


def test_auto_under_a_real_memory_cgroup(tiny_package):
    package, _ = tiny_package
    manifest = Manifest.load(package)
    import psutil

    # room for the process as it is, plus the reserve, plus a third of the experts
    third = full_budget(manifest) // 3
    reserve = kv_bytes_per_token(manifest.config) * 256 + 24 * MiB
    limit_bytes = psutil.Process().memory_info().rss + 64 * MiB + reserve + third
    with memory_limit(limit_bytes) as limit:
        if not limit.real:
            pytest.skip(f"no memory cgroup on this machine: {limit.reason}")
        model = edge_moe.load(package, budget="auto")
        assert "cgroup" in model.budget_note
        assert minimum_budget(manifest) <= model.budget < limit_bytes
        assert len(model.generate([3, 4, 5], max_new_tokens=4).token_ids) == 4
