"""`edge-moe bench` end to end on a tiny package: every configuration runs, makes the same tokens (the bench
refuses otherwise), and no demand-paging policy beats Belady's OPT on the recorded trace."""

import json

from edge_moe.cli import main


def test_bench_tables_and_opt_bound(tiny_package, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_package[0]), "--budgets", "40%,100%", "--policies", "lru,adaptive",
                 "--tokens", "6", "--prompt-tokens", "5", "--rounds", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert cache" in printed and "decode, all experts resident" in printed
    results = json.loads(out.read_text())
    rows = {row["config"]: row for row in results["cache"]["rows"]}
    assert {"all-resident", "no-cache", "lru no-prefetch @40%", "adaptive @40%"} <= set(rows)
    for budget in ("40%", "100%"):
        demand = rows[f"lru no-prefetch @{budget}"]
        assert demand["hit"] <= demand["opt_hit"] + 1e-9
        assert demand["rss_ok"] == "yes"
    assert rows["no-cache"]["hit"] == 0 and rows["all-resident"]["hit"] == 1
    assert results["decode"]["edge_moe"]["decode_tokens_per_second"] > 0

    # two rounds: every configuration ran twice, each run set against its own raw-bandwidth measurement, and the
    # speed ratios are medians of within-round ratios (recomputed here from the runs' own figures)
    configs = {c["name"]: c for c in results["cache"]["configs"]}
    assert all(len(c["runs"]) == 2 and all(run["raw_GB_s"] > 0 for run in c["runs"]) for c in configs.values())
    targets = {t["config"]: t for t in results["cache"]["targets"]}
    assert set(targets) == {"lru @40%", "adaptive @40%", "lru @100%", "adaptive @100%"}
    tok = {name: [run["decode_tok_s"] for run in c["runs"]] for name, c in configs.items()}
    for name, t in targets.items():
        budget = name.split(" @")[1]
        ratios = [a / b for a, b in zip(tok[name], tok[f"lru no-prefetch @{budget}"])]
        assert abs(t["vs_lru_no_prefetch"] - sum(ratios) / 2) < 1e-9
        assert abs(t["vs_no_cache"] - sum(a / b for a, b in zip(tok[name], tok["no-cache"])) / 2) < 1e-9
    assert "decode speed ratios" in printed
    # the offline replay: OPT reads no more than any policy, the known-frequency LFU included
    for row in results["cache"]["replay"]:
        reads = {k: v for k, v in row.items() if k.endswith("_MiB_per_tok") and k != "opt_MiB_per_tok"}
        assert set(reads) == {"lru_MiB_per_tok", "adaptive_MiB_per_tok", "lfu-known-frequencies_MiB_per_tok"}
        assert all(row["opt_MiB_per_tok"] <= v + 1e-9 for v in reads.values())
