"""edge_moe_demo: a desktop app (PySide6) that runs an MoE model under a memory budget and shows, token by
token, where every expert is (accelerator, RAM, being read, flash), with live budget/policy/prefetch controls.

Start it with `edge-moe-demo` (install with `pip install 'edge-moe[demo]'`).
"""
