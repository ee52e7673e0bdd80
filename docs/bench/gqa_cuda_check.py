"""Does a GroupQueryAttention layer graph give the same outputs on CUDA as on the CPU? (diagnostic)"""
import sys
import numpy as np
import onnxruntime as ort
from edge_moe.kv_cache import rope_tables
path = sys.argv[1]
cfg = dict(kvH=4, D=128, H=2048)
def session(providers, strict=False):
    o = ort.SessionOptions()
    if strict:
        o.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(path, o, providers=providers)
try:
    session(["CUDAExecutionProvider"], strict=True)
    print("every node has a CUDA kernel")
except Exception as e:
    print("CUDA-only session refused:", str(e).splitlines()[0][:300])
cpu, gpu = session(["CPUExecutionProvider"]), session(["CUDAExecutionProvider", "CPUExecutionProvider"])
rng = np.random.default_rng(0)
cap, past = 256, 40
cos, sin = rope_tables(cfg["D"], 1e6, cap)
for T in (1, 5):
    k = rng.standard_normal((1, cfg["kvH"], cap, cfg["D"])).astype(np.float32)
    v = rng.standard_normal((1, cfg["kvH"], cap, cfg["D"])).astype(np.float32)
    feeds = {"hidden_states": rng.standard_normal((T, cfg["H"])).astype(np.float32), "past_key": k, "past_value": v,
             "seqlens_k": np.array([past + T - 1], np.int32), "total_sequence_length": np.array(past + T, np.int32),
             "cos_cache": cos, "sin_cache": sin}
    a, b = cpu.run(None, feeds), gpu.run(None, feeds)
    for name, x, y in zip([o.name for o in cpu.get_outputs()], a, b):
        print(f"T={T} {name} shape cpu {x.shape} cuda {y.shape} max abs diff "
              f"{np.abs(x - y).max() if x.shape == y.shape else 'shape differs'} (scale {np.abs(x).max():.3g})")
