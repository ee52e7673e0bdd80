"""Where a decoded token's time goes, all experts resident, one thread: layer graphs, expert calls, embed + head,
and the rest (numpy glue, routing, Python). `python docs/bench/decode_breakdown.py PACKAGE [TOKENS [DEVICE]]`;
EDGE_MOE_HUGE_PAGES=0 keeps the weights on 4 KiB pages; EDGE_MOE_FUSED=0/1 turns the fused MoE layers off/on,
EDGE_MOE_STEP=0/1 the one graph a token (step_graph.py; its call is the "step" bucket) (default: load's choice)."""
import os
import sys
import time

import numpy as np

import edge_moe
from edge_moe import experts as experts_module

path, tokens = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
fused = {"0": False, "1": True}.get(os.environ.get("EDGE_MOE_FUSED", ""))
step = {"0": False, "1": True}.get(os.environ.get("EDGE_MOE_STEP", ""))
model = edge_moe.load(path, threads=1, huge_pages=os.environ.get("EDGE_MOE_HUGE_PAGES", "1") != "0", device=device,
                      fused_moe=fused, step_graph=step)
model.settle()
spent = {"layers": 0.0, "experts": 0.0, "embed+head": 0.0, "step": 0.0}


def timed(bucket, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[bucket] += time.perf_counter() - start
    return wrapper


class Timed:
    """A session stand-in that adds the time of run / run_bound to a bucket."""

    def __init__(self, session, bucket):
        self._session, self.run, self.run_bound = session, timed(bucket, session.run), timed(bucket, session.run_bound)

    def __getattr__(self, name):
        return getattr(self._session, name)


backbone = model.backbone
backbone.layers = [Timed(s, "layers") for s in backbone.layers]
backbone.embed, backbone.head = Timed(backbone.embed, "embed+head"), Timed(backbone.head, "embed+head")
forward = model.forward
forward.kernels.run = timed("experts", forward.kernels.run)  # per expert (through the accelerator tier if any)
if model.fused is not None:
    model.fused.session = Timed(model.fused.session, "experts")
if model.step_graph is not None:
    model.step_graph.session = Timed(model.step_graph.session, "step")
ids = np.random.default_rng(0).integers(2, model.config["vocab_size"], 64).astype(np.int64)
for rounds in range(2):
    cache = forward.new_cache()
    token = int(np.argmax(forward.logits(forward.hidden(ids, cache)[-1:])[0]))
    for key in spent:
        spent[key] = 0.0
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(forward.logits(forward.hidden(np.array([token], np.int64), cache))[0]))
    total = (time.perf_counter() - start) / tokens * 1e3
print(f"{path} ({device}{', fused' if model.fused else ''}{', one graph' if model.step_graph else ''}): {total:.2f} ms a token ({1e3 / total:.1f} tok/s): " + ", ".join(
    f"{k} {v / tokens * 1e3:.2f} ms" for k, v in spent.items()) + f", rest {total - sum(spent.values()) / tokens * 1e3:.2f} ms")
