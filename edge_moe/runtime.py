"""`edge_moe.load` and `Model`: the public face of the runtime."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .baselines import MmapExperts, NoCacheExperts
from .budget import auto_budget, check_memory, full_budget, parse_budget
from .accelerator import build_tier
from .cache import ExpertCache, store_for
from .devices import resolve_device
from .errors import EdgeMoeError
from .experts import AllResidentExperts, ExpertKernels
from .generate import GenerationResponse, GenerationResult, make_sampler, stream_tokens
from .manifest import Manifest
from .model import Backbone, Forward
from .policies import make_policy
from .prefetch import NextLayerPredictor
from .sessions import OrtClock, configure_threads
from .telemetry import peak_rss_bytes, rss_bytes
from .tokenizer import StreamingDecoder, Tokenizer


class Model:
    """A loaded package. Create with `edge_moe.load`."""

    def __init__(self, manifest: Manifest, *, threads: int | None = None, budget=None, policy: str = "adaptive",
                 prefetch: int = 2, io_threads: int = 8, direct_io: bool = True, trace: bool = False,
                 progress: bool = False, baseline: str | None = None, throttle=None, device="cpu",
                 gpu_budget=None, gpu_policy: str = "lfu", cost_model=None, recalibrate: bool = False):
        self.manifest = manifest
        self.config = manifest.config
        self.threads = configure_threads(threads)
        self.clock = OrtClock()
        self.tokenizer = Tokenizer(manifest.tokenizer) if manifest.tokenizer else None
        self.device = resolve_device(device)
        self.backbone = Backbone(manifest, self.clock, providers=self.device.providers,
                                 ort_device=self.device.ort_device)
        self.rss_baseline_bytes = rss_bytes()
        self.trace: list | None = [] if trace else None
        self.store = store_for(manifest, io_threads=io_threads, direct=direct_io, throttle=throttle)
        self.budget_note = None
        if isinstance(budget, str) and budget.strip().lower() == "auto":  # after the backbone: its memory counts
            budget, self.budget_note = auto_budget(manifest)
        self.budget = None if budget is None else parse_budget(budget, manifest)
        predictor = None
        if baseline == "mmap":
            self.experts = MmapExperts(manifest, trace=self.trace)
        elif baseline == "no-cache":
            self.experts = NoCacheExperts(manifest, self.store, trace=self.trace)
        elif baseline is not None:
            raise EdgeMoeError(f"baseline {baseline!r} is unknown; choose mmap or no-cache")
        elif self.budget is None:
            check_memory(full_budget(manifest), "keeping every expert resident", "pass --budget 25% (budget=...) "
                         "to stream experts from flash")
            with tqdm(total=len(manifest.experts), desc="load experts", unit="expert", disable=not progress) as bar:
                self.experts = AllResidentExperts(manifest, self.store, bar, trace=self.trace)
        else:
            self.experts = ExpertCache(manifest, self.store, make_policy(policy), self.budget, trace=self.trace)
            predictor = NextLayerPredictor(manifest, depth=prefetch) if prefetch > 0 else None
        self.predictor = predictor
        self.kernels = ExpertKernels(self.clock)
        # With an accelerator, Forward gets experts and kernels through its tier (accelerator.py), which keeps
        # self.experts as the RAM tier behind it.
        self.accelerator = None
        experts, kernels = self.experts, self.kernels
        if self.device.accelerator:
            self.accelerator = build_tier(self, gpu_budget, gpu_policy, cost_model, recalibrate, progress)
            experts, kernels = self.accelerator, self.accelerator.kernels
        self.forward = Forward(manifest, self.backbone, experts, kernels, predictor)
        if self.accelerator is not None:
            self.forward.route_observers.append(self.accelerator.observe_routes)

    def pin(self, keys) -> None:
        """Keeps these (layer, index) experts resident for good (a budgeted model only)."""
        if self.budget is None:
            return  # all experts are resident anyway
        self.experts.pin(keys)

    def expert_stats(self) -> dict:
        """Cache, flash and prefetch counters so far."""
        s = self.store.stats
        stats = {"bytes_read": s.bytes_read, "reads": s.reads, "read_seconds": s.read_seconds,
                 "read_busy_seconds": s.busy_seconds,
                 "checksum_seconds": s.checksum_seconds, "resident_bytes": self.experts.resident_bytes(),
                 "budget_bytes": self.budget}
        cache = getattr(self.experts, "stats", None)
        if cache is not None:
            stats.update(hits=cache.hits, misses=cache.misses, evictions=cache.evictions,
                         stall_seconds=cache.stall_seconds, prefetch_issued=cache.prefetch_issued,
                         prefetch_skipped=cache.prefetch_skipped, prefetch_dropped=cache.prefetch_dropped,
                         peak_resident_bytes=cache.peak_resident_bytes)
        else:
            stats.update(hits=self.experts.lookup_hits, misses=self.experts.lookups - self.experts.lookup_hits,
                         stall_seconds=0.0)
        if self.accelerator is not None:
            stats["tiers"] = self.accelerator.stats_dict()
        if self.predictor is not None:
            stats.update(prefetch_precision=self.predictor.precision, prefetch_recall=self.predictor.recall)
        return stats

    # Tokens ------------------------------------------------------------------------------------------

    def encode(self, prompt) -> list[int]:
        """A string (through the tokenizer) or a list of token ids -> checked token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise EdgeMoeError("the prompt is empty; give some text or at least one token id")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # a command line with bytes that are not UTF-8 (surrogate escapes)
                raise EdgeMoeError(f"the prompt is not valid UTF-8 text (byte {exc.start}); pass UTF-8 text or "
                                   "token ids (--prompt-ids)") from None
            if self.tokenizer is None:
                raise EdgeMoeError(f"{self.manifest.root}: the package has no tokenizer.json; pass token ids "
                                   "(--prompt-ids) instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise EdgeMoeError("the prompt is empty; give some text or at least one token id")
        vocab = self.config["vocab_size"]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise EdgeMoeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1}); use ids the "
                               "model's tokenizer produces")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    # Inference ---------------------------------------------------------------------------------------

    def logits(self, input_ids) -> np.ndarray:
        """A fresh prefill of `input_ids`; returns float32 logits [len(input_ids), vocab]."""
        ids = self.encode(list(input_ids))
        self._check_context(len(ids))
        cache = self.forward.new_cache()
        return self.forward.logits(self.forward.hidden(np.asarray(ids, dtype=np.int64), cache))

    def stream_generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None):
        """Yields a GenerationResponse per generated token.

        Args:
            prompt: text, or a list of token ids.
            max_new_tokens: at most this many tokens (>= 1); generation also stops at an end-of-sequence token.
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_p: nucleus sampling mass in (0, 1].
            seed: makes sampling reproducible.
        Raises:
            EdgeMoeError: empty prompt, ids outside the vocabulary, bad sampling values, context too long.
        """
        ids = self.encode(prompt)
        if int(max_new_tokens) < 1:
            raise EdgeMoeError(f"max_new_tokens (-n) is {max_new_tokens}; it must be at least 1")
        self._check_context(len(ids) + int(max_new_tokens))
        sample = make_sampler(float(temperature), float(top_p), seed)
        eos = set(self.config.get("eos_token_ids") or [])
        yield from stream_tokens(self.forward, ids, int(max_new_tokens), sample, eos, StreamingDecoder(self.tokenizer))

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> GenerationResult:
        """Runs `stream_generate` to the end; returns text, token ids and stats."""
        ids = self.encode(prompt)
        ort_before, calls_before = self.clock.seconds, self.clock.calls
        start = time.perf_counter()
        responses: list[GenerationResponse] = list(self.stream_generate(ids, max_new_tokens, temperature, top_p,
                                                                        seed))
        total = time.perf_counter() - start
        tokens = [r.token for r in responses]
        last = responses[-1]
        decode_seconds = max(total - last.prefill_seconds, 1e-12)
        stats = {
            "prompt_tokens": len(ids), "generated_tokens": len(tokens),
            "prefill_seconds": last.prefill_seconds, "decode_seconds": decode_seconds,
            "prefill_tokens_per_second": len(ids) / max(last.prefill_seconds, 1e-12),
            "decode_tokens_per_second": (len(tokens) - 1) / decode_seconds if len(tokens) > 1 else 0.0,
            "ort_seconds": self.clock.seconds - ort_before, "ort_calls": self.clock.calls - calls_before,
            "total_seconds": total, "threads": self.threads,
            "rss_baseline_bytes": self.rss_baseline_bytes, "peak_rss_bytes": peak_rss_bytes(),
            **self.expert_stats(),
        }
        return GenerationResult(self.decode(tokens), tokens, ids, last.finish_reason or "length", stats)

    def _check_context(self, tokens: int) -> None:
        limit = int(self.config.get("max_position_embeddings") or 1 << 30)
        if tokens > limit:
            raise EdgeMoeError(f"prompt plus new tokens is {tokens}, over the model's context of {limit}; "
                               "shorten the prompt or lower -n")


def load(path: str | Path | None = None, **options) -> Model:
    """Opens a model package.

    Args:
        path: a directory written by `edge-moe export`; None opens the default model that ships with edge_moe
            (exported into the per-user cache on first use).
        threads: onnxruntime threads (default: physical cores); the first load in a process sets the pool.
        budget: None keeps every expert resident; else bytes, '512MB', '2GiB' or '25%' of the expert bytes
            bound what expert residency may use (weights, read buffers); experts stream from flash. 'auto': what
            the process may still use after loading the backbone (its memory cgroup's limit, page cache counted,
            else available RAM) less the KV cache of 1,024 tokens and 32 MiB; `model.budget_note` says how.
        policy: residency policy under a budget: 'lru', 'lfu' or 'adaptive' (default).
        prefetch: layers ahead to predict and read speculatively (0: off).
        io_threads: flash reader threads. direct_io: bypass the page cache with O_DIRECT where possible.
        trace: record (step, layer, experts, hit) for every MoE layer visit in `model.trace`.
        baseline: 'mmap' or 'no-cache' replace the cache with what the benchmark compares it to.
        progress: show a progress bar while experts load.
        throttle: emulate a slower flash device (edge_moe.emulate.TokenBucket; `--emulate PROFILE` sets it).
        device: 'cpu' (default), 'cuda', or 'auto' (the accelerator if its provider loads, else the CPU with a
            notice); with an accelerator the backbone runs there and experts get a third tier (accelerator.py).
        gpu_budget: expert bytes on the accelerator: bytes, '4GiB' or '25%' of the expert bytes; None: all.
        gpu_policy: the accelerator tier's residency policy ('lfu' default, 'lru', 'adaptive').
        cost_model: placement.CostModel or a path to its JSON; None: this machine's cached calibration.
        recalibrate: measure the cost model again at load even if cached.
    Returns:
        A Model.
    Raises:
        EdgeMoeError: the package is missing, corrupt or of an unsupported format version; a bad budget or policy.
    """
    if path is None:
        from .default_model import default_model_path

        path = default_model_path(progress=options.get("progress", True))
    return Model(Manifest.load(path), **options)
