"""The experiment behind step_graph.Replay (the runtime's CUDA-graph decode since stop 16), kept to compare the
captured step with the uncaptured one on a fixed-shape session: the step graph under onnxruntime's CUDA graph capture
(`enable_cuda_graph`, free-dimension overrides T=1 and M=capacity, every input and output bound to fixed device
buffers), beside the normal step on its own cache, token for token; each with GroupQueryAttention's
total_sequence_length at the current length and at the capacity.

`python docs/bench/cuda_graph_step.py PACKAGE cuda` (after gpu_run.sh setup: /tmp/g/f16); `... cpu` checks the
binding logic on the CPU provider (fused, float16 attention, no capture).

Measured on the H200: stop 15, the captured step 1.08 ms against 1.67-1.77 uncaptured, but only the first replayed
token right (later ones 1e-2 - 6e-2 off). Stop 16: that was total_sequence_length, a host input the capture freezes;
held at the capacity (seqlens_k, on the device, carries the lengths) every replayed token matches (1e-4, as
uncaptured) at 1.03 ms against 1.76."""
import sys, time, numpy as np, onnxruntime as ort, edge_moe
from edge_moe.step_graph import build_step_model, per_layer, IDS
from edge_moe.fused_moe import HIDDEN, ROUTE_INDICES
pkg, dev = sys.argv[1], sys.argv[2]
kw = {"device": "cuda"} if dev == "cuda" else {"fused_moe": True, "half_attention": True}
m = edge_moe.load(pkg, **kw); m.settle()
sg, f = m.step_graph, m.forward
CAP, P = 512, 64
H = int(m.config["hidden_size"])
prompt = np.random.default_rng(0).integers(2, 1000, P).astype(np.int64)
model = build_step_model(m.manifest, m.backbone.half_attention, sg.fused.dtype, sg.fused.top_k)
def trial(graph, tot_cap=False):
    A, B = f.new_cache(), f.new_cache()
    for c in (A, B):
        c.reserve(CAP); f.hidden(prompt, c)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(m.manifest.embed.parent))
    so.add_free_dimension_override_by_name("T", 1); so.add_free_dimension_override_by_name("M", CAP)
    so.log_severity_level = 2
    prov = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graph else "0"})] if dev == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=prov)
    where = ("cuda", 0) if dev == "cuda" else ("cpu", 0)
    ids_np, seq_np, tot_np = np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros((), np.int32)
    ids_v, seq_v = ort.OrtValue.ortvalue_from_numpy(ids_np, *where), ort.OrtValue.ortvalue_from_numpy(seq_np, *where)
    tot_v = ort.OrtValue.ortvalue_from_numpy(tot_np)
    hid_v = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, H), np.float32), *where)
    io = sess.io_binding()
    io.bind_ortvalue_input(IDS, ids_v); io.bind_ortvalue_input("seqlens_k", seq_v); io.bind_ortvalue_input("total_sequence_length", tot_v)
    io.bind_ortvalue_input("cos_cache", B._shared["cos_cache"]); io.bind_ortvalue_input("sin_cache", B._shared["sin_cache"])
    for layer in range(len(m.manifest.layers)):
        k, v = B._kv[layer]
        for n, val in (("past_key", k), ("past_value", v)): io.bind_ortvalue_input(per_layer(n, layer), val)
        for n, val in (("key", k), ("value", v)): io.bind_ortvalue_output(per_layer(n, layer), val)
    for layer in sg.moe_layers:
        sg.fused.bind_stacks(io, layer, lambda name, layer=layer: per_layer(name, layer))
        io.bind_ortvalue_output(per_layer(ROUTE_INDICES, layer), ort.OrtValue.ortvalue_from_numpy(np.zeros((1, sg.fused.top_k), np.int64), *where))
    io.bind_ortvalue_output(HIDDEN, hid_v)
    def step_b(token):
        pos = B.offset
        ids_np[0], seq_np[0], tot_np[()] = token, pos, (CAP if tot_cap else pos + 1)
        ids_v.update_inplace(ids_np); seq_v.update_inplace(seq_np)
        sess.run_with_iobinding(io); B.advance(1)
        return hid_v.numpy()
    tok, diffs = 7, []
    for s in range(24):
        ha = f.hidden(np.array([tok], np.int64), A)
        hb = step_b(tok)
        diffs.append(float(np.abs(ha - hb).max() / np.abs(ha).max()))
        tok = int(np.argmax(f.logits(ha)[0]))
    N = 200
    t = time.perf_counter()
    for _ in range(N): step_b(tok)
    tb = (time.perf_counter() - t) / N
    t = time.perf_counter()
    for _ in range(N): f.hidden(np.array([tok], np.int64), A)
    ta = (time.perf_counter() - t) / N
    print(f"{dev} graph={graph} total_sequence_length={'capacity' if tot_cap else 'length'}: fixed-shape step {tb*1e3:.3f} ms, normal step {ta*1e3:.3f} ms; rel diff per step " + " ".join(f"{d:.0e}" for d in diffs), flush=True)
trial(False)
trial(True)
trial(False, tot_cap=True)
trial(True, tot_cap=True)
