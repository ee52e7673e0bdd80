"""Train the small Qwen3-MoE model that ships inside edge_moe (edge_moe/default_model/).

Recipe (see training/README.md for the whole pipeline):
  corpus    CPython 3.11.7 standard library + its pydoc reference text (training/corpus.py), PSF licence
  tokenizer byte-level BPE, 4096 tokens (training/train_tokenizer.py) -> train.npy / heldout.npy
  model     Qwen3-MoE from transformers' config: 8 layers, hidden 256, 16 routed experts of SwiGLU width 88,
            top-2 with renormalised weights, tied embeddings; about 11.3 M parameters (22.6 MB in float16)
  loss      next-token cross-entropy + ROUTER_AUX_COEF * the Switch load-balancing loss over all layers.
            0.01 evens out expert popularity across a batch without forcing every token to spread out,
            so routing stays skewed per token and correlated between neighbouring tokens
  optimiser AdamW (fused), linear warmup then cosine to LR_MIN, bf16 autocast over float32 weights
  data      random windows of CONTEXT tokens from the concatenated train split (seeded)
The held-out loss is measured every EVAL_EVERY steps; the weights with the best held-out loss are saved
(float16, save_pretrained) together with the log.

    python training/train_default_model.py --data .train --out out      # on a GPU: under 2 minutes of training on an H200
    python training/train_default_model.py --data .train --bench        # a few steps per experts kernel
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

SEED = 1234
# model
VOCAB = 4096
HIDDEN = 256
LAYERS = 8
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
EXPERTS, TOP_K = 16, 2
MOE_FFN = 88            # the largest width (multiple of 8) that keeps the float16 package under 24 MB
CONTEXT = 512
ROUTER_AUX_COEF = 0.01
EOT_ID = 0              # <|endoftext|>, bos = eos
# optimisation
BATCH = 128             # sequences per step: 65k tokens
STEPS = 1200            # about 9.8 epochs: held-out loss bottoms out near 8 epochs (ablation_logs/: 1800 and 3500 steps overfit)
LR, LR_MIN = 2e-3, 2e-4
WARMUP = 200
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LOG_EVERY = 50
EVAL_EVERY = 250
EVAL_WINDOWS = 256      # held-out windows per periodic eval (131k tokens); the final eval uses all


def model_config():
    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=MOE_FFN,
        intermediate_size=TOP_K * MOE_FFN,  # unused (no dense layers); the active width, for readers
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        router_aux_loss_coef=ROUTER_AUX_COEF, output_router_logits=False,  # turned on per training call
        tie_word_embeddings=True, max_position_embeddings=CONTEXT,
        bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID,
    )


def bf16_grouped_experts(self, hidden_states, top_k_index, top_k_weights):
    """Experts as two grouped GEMMs in bf16 over float32 master weights (grouped_mm is not autocast-aware).

    T = tokens, K = top-k, S = T*K, E = experts, H = hidden, I = expert width.
    """
    k = top_k_index.shape[-1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))                       # [S]
    token = perm // k                                                             # [S]
    ids = expert_ids.int() if expert_ids.is_cuda else expert_ids.float()  # histc: int on CUDA, float on CPU
    counts = torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)                             # [E]
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    x = hidden_states[token].to(torch.bfloat16)                                   # [S, H]
    gate_up = grouped_mm(x, self.gate_up_proj.to(torch.bfloat16).transpose(1, 2), offs=offs)  # [S, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = grouped_mm(self.act_fn(gate) * up, self.down_proj.to(torch.bfloat16).transpose(1, 2), offs=offs)
    y = y.float() * top_k_weights.reshape(-1)[perm, None].float()                 # [S, H]
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    return out.index_add_(0, token, y).to(hidden_states.dtype)                    # [T, H]


ALL_EXPERTS_FUNCTIONS.register("bf16_grouped", bf16_grouped_experts)


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR_MIN + 0.5 * (LR - LR_MIN) * (1 + math.cos(math.pi * t))


def count_params(model) -> dict:
    n = lambda ps: sum(p.numel() for p in ps)
    total = n(model.parameters())  # tied lm_head counted once
    expert_tensors = [p for name, p in model.named_parameters() if ".experts." in name]
    per_expert = n(expert_tensors) // (LAYERS * EXPERTS)
    return {"total": total, "per_expert": per_expert, "experts_all": n(expert_tensors),
            "active_per_token": total - n(expert_tensors) + LAYERS * TOP_K * per_expert}


@torch.no_grad()
def heldout_loss(model, data: torch.Tensor, windows: int | None) -> float:
    """Mean next-token loss over consecutive, non-overlapping CONTEXT windows of the held-out split."""
    n = (len(data) - 1) // CONTEXT if windows is None else min(windows, (len(data) - 1) // CONTEXT)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, BATCH):
        rows = torch.arange(i, min(n, i + BATCH), device=data.device)
        x = data[rows[:, None] * CONTEXT + torch.arange(CONTEXT + 1, device=data.device)]  # [B, C+1]
        with torch.autocast(data.device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + x[:, 1:].numel()
    model.train()
    return total / count


def train_step(model, opt, data, gen, step) -> tuple[float, float]:
    starts = torch.randint(0, len(data) - CONTEXT, (BATCH,), generator=gen).to(data.device)
    x = data[starts[:, None] + torch.arange(CONTEXT, device=data.device)]         # [B, C]
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
    with torch.autocast(data.device.type, dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x, output_router_logits=True)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return out.loss.detach(), out.aux_loss.detach()


def build(device):
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(model_config(), dtype=torch.float32).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]     # no decay on norms
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, fused=True)
    return model, opt


def bench(data, device):
    """A few steps per experts kernel (and batch size), to pick the fastest that works on this machine."""
    global BATCH
    for impl, BATCH in (("bf16_grouped", 128), ("bf16_grouped", 256), ("grouped_mm", 128), ("eager", 128)):
        try:
            model, opt = build(device)
            model.set_experts_implementation(impl)
            gen = torch.Generator().manual_seed(SEED)
            for s in range(3):
                train_step(model, opt, data, gen, s)
            torch.cuda.synchronize()
            t0 = time.time()
            for s in range(10):
                loss, aux = train_step(model, opt, data, gen, s)
            torch.cuda.synchronize()
            dt = (time.time() - t0) / 10
            print(f"{impl} batch {BATCH}: {dt * 1000:.0f} ms/step, {BATCH * CONTEXT / dt / 1e3:.0f}k tok/s, loss {loss.item():.3f} "
                  f"aux {aux.item():.3f}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        except Exception as e:  # report and try the next kernel
            print(f"{impl}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def main() -> None:
    global STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".train", help="folder with train.npy and heldout.npy")
    ap.add_argument("--out", default="out", help="folder for the checkpoint (ckpt/) and train_log.txt")
    ap.add_argument("--experts-impl", default="bf16_grouped", help="bf16_grouped | grouped_mm | eager")
    ap.add_argument("--max-minutes", type=float, default=8.5, help="safety stop; the log says if it fired")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test of a few steps")
    ap.add_argument("--steps", type=int, default=STEPS, help="override STEPS (smoke tests only)")
    ap.add_argument("--bench", action="store_true", help="time a few steps per experts kernel and exit")
    args = ap.parse_args()
    random.seed(SEED)
    np.random.seed(SEED)
    STEPS = args.steps
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    data_dir = Path(args.data)
    train = torch.from_numpy(np.load(data_dir / "train.npy").astype(np.int64)).to(device)
    heldout = torch.from_numpy(np.load(data_dir / "heldout.npy").astype(np.int64)).to(device)
    if args.bench:
        return bench(train, device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    model, opt = build(device)
    model.set_experts_implementation(args.experts_impl)
    params = count_params(model)
    hp = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, tuple))}
    log(f"# hardware: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, experts kernel {args.experts_impl}")
    log(f"# hyper-parameters: {json.dumps(hp)}")
    log(f"# parameters: {json.dumps(params)}")
    log(f"# data: train {len(train):,} tokens, held-out {len(heldout):,} tokens; "
        f"{STEPS * BATCH * CONTEXT / len(train):.1f} epochs")
    log("step\tce\taux\tlr\ttok_per_s\telapsed_s\theldout_ce")

    gen = torch.Generator().manual_seed(SEED)
    best, best_state, t0 = float("inf"), None, time.time()
    ce_sum, aux_sum, n, t_log = 0.0, 0.0, 0, time.time()
    for step in range(STEPS):
        loss, aux = train_step(model, opt, train, gen, step)
        ce_sum, aux_sum, n = ce_sum + (loss - ROUTER_AUX_COEF * aux), aux_sum + aux, n + 1
        last = step == STEPS - 1 or time.time() - t0 > args.max_minutes * 60
        if (step + 1) % LOG_EVERY == 0 or last:
            held = ""
            if (step + 1) % EVAL_EVERY == 0 or last:
                h = heldout_loss(model, heldout, EVAL_WINDOWS)
                held = f"{h:.4f}"
                if h < best:
                    best, best_step = h, step + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            tok_s = n * BATCH * CONTEXT / (time.time() - t_log)
            log(f"{step + 1}\t{(ce_sum / n).item():.4f}\t{(aux_sum / n).item():.4f}\t{lr_at(step):.2e}\t"
                f"{tok_s:.0f}\t{time.time() - t0:.0f}\t{held}")
            ce_sum, aux_sum, n, t_log = 0.0, 0.0, 0, time.time()
        if last:
            break
    train_s = time.time() - t0
    if step + 1 < STEPS:
        log(f"# safety stop after {step + 1} of {STEPS} steps ({train_s:.0f} s)")

    model.load_state_dict(best_state)
    full = heldout_loss(model, heldout, None)
    log(f"# done: {step + 1} steps in {train_s:.0f} s; best periodic held-out ce {best:.4f} at step {best_step}; "
        f"full held-out ce {full:.4f} (ppl {math.exp(full):.2f}) with those weights")
    model.set_experts_implementation("grouped_mm")  # the library default, not our training-only kernel
    # float16 shards under 16 MB each: the device tool returns files of at most 16 MB.
    model.to(torch.float16).save_pretrained(out / "ckpt", safe_serialization=True, max_shard_size="12MB")
    log_file.close()


if __name__ == "__main__":
    main()
