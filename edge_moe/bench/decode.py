"""All-resident decode speed against its floors: transformers' eager PyTorch on the same checkpoint and threads,
and the memory-bandwidth floor (weight bytes touched per token / streaming read bandwidth measured now)."""

from __future__ import annotations

import time

import numpy as np

from ..onnx_build import GraphBuilder
from ..sessions import open_session


def decode_run(model, prompt_ids: list[int], new_tokens: int) -> dict:
    """One greedy generation; splits prefill from decode and the time inside onnxruntime from the rest."""
    clock = model.clock
    start = time.perf_counter()
    first = ort_at_first = None
    count = 0
    for response in model.stream_generate(prompt_ids, max_new_tokens=new_tokens):
        count += 1
        if first is None:
            first, ort_at_first = time.perf_counter(), clock.seconds
    end = time.perf_counter()
    decode_seconds = end - first
    return {
        "prefill_tokens_per_second": len(prompt_ids) / (first - start),
        "decode_tokens_per_second": (count - 1) / decode_seconds,
        "decode_share_outside_ort": 1.0 - (clock.seconds - ort_at_first) / decode_seconds,
        "generated_tokens": count,
        "total_seconds": end - start,
    }


def weight_bytes_per_token(manifest) -> int:
    """Weights one decoded token reads: the backbone but for one embedding row, plus top-k experts per MoE layer."""
    c = manifest.config
    embed_table = c["vocab_size"] * c["hidden_size"] * (2 if manifest.dtype == "float16" else 4)
    tied = c.get("tie_word_embeddings")
    backbone = manifest.backbone_bytes - (0 if tied else embed_table)
    mean_expert = manifest.expert_bytes / max(len(manifest.experts), 1)
    return int(backbone + c["top_k"] * len(c["moe_layers"]) * mean_expert)


def weight_read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes/s at which onnxruntime streams a float32 weight matrix through a 1-row product (decode's access
    pattern), on the global thread pool; the best of `repeats`."""
    k = 4096
    n = nbytes // (4 * k)
    g = GraphBuilder("bandwidth")
    x = g.input("x", "float32", [1, k])
    w = g.input("w", "float32", [n, k])
    g.output(g.linear(x, w), "y", "float32", [1, n])
    session = open_session(g.model().SerializeToString())
    feeds = {"x": np.ones((1, k), np.float32), "w": np.random.default_rng(0).standard_normal((n, k), np.float32)}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return feeds["w"].nbytes / best


def transformers_decode(hf_dir, prompt_ids: list[int], new_tokens: int, threads: int) -> dict:
    """transformers' eager implementation on the same checkpoint and thread count (needs torch)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        from ..errors import EdgeMoeError

        raise EdgeMoeError("--reference needs torch and transformers: pip install 'edge-moe[test]'") from None
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt_ids])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = timed(1)
    total = timed(new_tokens)
    return {"prefill_tokens_per_second": len(prompt_ids) / prefill,
            "decode_tokens_per_second": (new_tokens - 1) / max(total - prefill, 1e-9)}
