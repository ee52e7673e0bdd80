"""Per decode step, how far --device cuda is from the CPU on the same tokens (diagnostic: a growing gap is state,
a spike is a routing near-tie)."""
import sys
import numpy as np
from edge_moe import load
path = sys.argv[1]
cpu, gpu = load(path, device="cpu"), load(path, device="cuda")
caches = [m.forward.new_cache() for m in (cpu, gpu)]
ids = np.random.default_rng(0).integers(2, cpu.config["vocab_size"], int(sys.argv[2])).astype(np.int64)
for step in range(int(sys.argv[3])):
    a, b = (m.forward.logits(m.forward.hidden(ids, c)) for m, c in zip((cpu, gpu), caches))
    rel = np.abs(a - b).max(-1) / np.abs(a).max(-1)
    if step == 0 or step % 4 == 0 or rel.max() > 1e-3:
        print(f"step {step} rows {len(rel)} max rel {rel.max():.2e} worst row {int(rel.argmax())} argmax equal "
              f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{len(rel)} cache {caches[1].offset}")
    ids = np.asarray([int(a[-1].argmax())], dtype=np.int64)
