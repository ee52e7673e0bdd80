"""`edge-moe bench` end to end on a tiny package: every configuration runs, makes the same tokens (the bench
refuses otherwise), and no demand-paging policy beats Belady's OPT on the recorded trace."""

import json

from edge_moe.cli import main


def test_bench_tables_and_opt_bound(tiny_package, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_package[0]), "--budgets", "40%,100%", "--policies", "lru,adaptive",
                 "--tokens", "6", "--prompt-tokens", "5", "--json", str(out)]) == 0
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
