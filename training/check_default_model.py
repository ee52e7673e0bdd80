"""Smoke check of a trained checkpoint on CPU: held-out loss vs a unigram baseline, sample generations,
and routing statistics (what the cache and prefetcher will see).

    python training/check_default_model.py --model edge_moe/default_model --data .train

Routing statistics, per layer, over held-out windows:
  entropy   entropy of expert popularity (share of top-k picks), against log(E) for perfectly even use
  top share share of the picks that go to the most popular expert
  share     how often token t+1 uses at least one of token t's experts, against the same rate if tokens
            picked experts independently with those popularities (the gap is temporal correlation)
  overlap   mean |experts(t) & experts(t+1)| / k
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]


def independent_share(p: np.ndarray, k: int, trials: int = 20000, seed: int = 0) -> float:
    """P(two independent top-k picks share an expert), sampling k distinct experts by popularity."""
    rng = np.random.default_rng(seed)
    p = p / p.sum()
    a = [set(rng.choice(len(p), k, replace=False, p=p)) for _ in range(trials)]
    b = [set(rng.choice(len(p), k, replace=False, p=p)) for _ in range(trials)]
    return float(np.mean([bool(x & y) for x, y in zip(a, b)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edge_moe/default_model")
    ap.add_argument("--data", default=".train", help="folder with train.npy and heldout.npy")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of the model's context")
    ap.add_argument("--new-tokens", type=int, default=80)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    cfg = model.config
    ctx, e, k, vocab = cfg.max_position_embeddings, cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size
    train = np.load(Path(args.data) / "train.npy").astype(np.int64)
    held = np.load(Path(args.data) / "heldout.npy").astype(np.int64)

    # Held-out loss and routing on the first windows of the held-out split.
    n = min(args.windows, (len(held) - 1) // ctx)
    x = torch.from_numpy(held[: n * ctx + 1])
    nll, picks = 0.0, [[] for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        for i in range(n):
            w = x[i * ctx: (i + 1) * ctx + 1][None]
            out = model(input_ids=w[:, :-1], output_router_logits=True)
            nll += torch.nn.functional.cross_entropy(out.logits[0], w[0, 1:], reduction="sum").item()
            for layer, logits in enumerate(out.router_logits):              # [T, E]
                picks[layer].append(logits.topk(k, dim=-1).indices.numpy())  # [T, k]
    ce = nll / (n * ctx)

    # Unigram baseline: train-split counts with add-one smoothing, scored on the same held-out tokens.
    counts = np.bincount(train, minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    uni = -logp[held[1: n * ctx + 1]].mean()
    print(f"held-out: {n * ctx:,} tokens, ce {ce:.4f} nats (ppl {math.exp(ce):.2f}); "
          f"unigram ce {uni:.4f} (ppl {math.exp(uni):.1f})")

    print(f"\nrouting over {n * ctx:,} held-out tokens; log(E) = {math.log(e):.3f}")
    print("layer  entropy  top_share  share(t,t+1)  independent  overlap")
    for layer, chunks in enumerate(picks):
        sel = np.concatenate(chunks)                                       # [N, k]
        p = np.bincount(sel.ravel(), minlength=e) / sel.size
        ent = -(p[p > 0] * np.log(p[p > 0])).sum()
        sets = [set(r) for r in sel]
        # pairs inside one window only: the window boundary is not a real neighbour
        pairs = [(sets[j], sets[j + 1]) for j in range(len(sets) - 1) if (j + 1) % ctx]
        share = np.mean([bool(a & b) for a, b in pairs])
        overlap = np.mean([len(a & b) / k for a, b in pairs])
        print(f"{layer:5d}  {ent:7.3f}  {p.max():9.3f}  {share:12.3f}  {independent_share(p, k):11.3f}  {overlap:7.3f}")

    print()
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        for mode, kw in (("greedy", dict(do_sample=False)), ("sampled T=0.8", dict(do_sample=True, temperature=0.8, top_k=50))):
            torch.manual_seed(0)
            gen = model.generate(ids, max_new_tokens=args.new_tokens, pad_token_id=cfg.eos_token_id, **kw)
            print(f"--- {prompt!r} ({mode})\n{tok.decode(gen[0].tolist(), skip_special_tokens=False)}\n")


if __name__ == "__main__":
    main()
