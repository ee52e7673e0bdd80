"""`edge_moe.load` and `Model`: the public face of the runtime."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .baselines import MmapExperts, NoCacheExperts
from .budget import Budget, auto_budget, check_memory, full_budget, parse_budget
from .accelerator import build_tier, parse_gpu_budget
from .cache import ExpertCache, store_for
from .memory_limits import memory_headroom, return_freed_memory
from .chat import ChatTemplate
from .devices import resolve_device
from .errors import EdgeMoeError
from .experts import AllResidentExperts, ExpertKernels, stored_tensors
from .fused_moe import FusedMoeLayers, experts_run_native, experts_run_quantized, unfusable_reason
from .generate import GenerationResponse, GenerationResult, PromptCache, Sequence, stream_tokens
from .huge_pages import HugePageKeeper
from .manifest import Manifest
from .model import Backbone, Forward
from .policies import make_policy
from .prefetch import NextLayerPredictor
from .sampling import Sampler, SamplingOptions
from .sessions import OrtClock, configure_threads, shared_pool
from .step_graph import StepGraph, unsupported_reason as unsupported_step_reason
from .telemetry import peak_rss_bytes, rss_bytes
from .tokenizer import StreamingDecoder, Tokenizer


SIDE_BY_SIDE_MAX_HIDDEN = 1024  # measured gains at hidden 512 (2 threads), losses at 2048 (16 threads)


# Peak memory of loading quantized experts fused, per stored expert byte: the stacks (1x) beside onnxruntime's packed
# copy (1.38x at 8 bits block 32, 1.68x at 4 bits block 128: stop 16, this VM), before the stacks go
FUSED_LOAD_PEAK = 2.7


class Model:
    """A loaded package. Create with `edge_moe.load`."""

    def __init__(self, manifest: Manifest, *, threads: int | None = None, budget=None, policy: str = "adaptive",
                 prefetch: int = 2, io_threads: int = 8, direct_io: bool = True, trace: bool = False,
                 progress: bool = False, baseline: str | None = None, throttle=None, device="cpu",
                 gpu_budget=None, gpu_policy: str = "lfu", cost_model=None, recalibrate: bool = False,
                 huge_pages: bool = True, thread_pool: str | None = None, fused_moe: bool | None = None,
                 half_attention: bool | None = None, step_graph: bool | None = None,
                 cuda_graph: bool | None = None, native_kernel: bool | None = None):
        self.manifest = manifest
        self.config = manifest.config
        return_freed_memory()  # stacks and read buffers freed during load go back to the OS, not to the heap
        spec = Budget.parse(budget)
        everything = spec.unlimited and baseline is None  # every expert resident
        # edge_moe's kernels may run here (native.py): float16 or quantized experts they read, the kernels built
        self.kernel = native_kernel is not False
        native = self.kernel and experts_run_native(manifest)
        # edge_moe's kernels run on their own threads between onnxruntime's calls: a shared pool would spin
        # through it (2 threads, q3-f16e: decode 54-68 tok/s, against 79-85 with per-session pools that spin only
        # while a call lasts; prefill 187 against 319-403). Chosen before the device is probed: its probe opens a
        # session, and the pool must be set before any.
        spinning = native and everything and fused_moe is not False and device in (None, "cpu")
        self.threads = configure_threads(threads, thread_pool or ("per-session-spinning" if spinning else None) or
                                         os.environ.get("EDGE_MOE_THREAD_POOL") or "per-session")
        self.clock = OrtClock()
        self.tokenizer = Tokenizer(manifest.tokenizer) if manifest.tokenizer else None
        self.device = resolve_device(device)
        fuse = self._fuse(fused_moe, baseline, gpu_budget, everything, native)
        # Side by side (Forward's workers): a layer's resident experts on several threads, a whole expert each, and
        # every graph on one intra-op thread, because per-session pools sleep between calls and waking them costs
        # more than it gives on decode's small products (2 threads, 8-bit experts: 84-89 tok/s against 96 at one
        # thread; 87-93 with one-thread graphs); prefill's parallelism then comes from its many experts. Only for
        # small models on few threads: with more threads than a token has experts, or graphs too large for one
        # thread, it is much slower (H200 CPU, 16 threads, Qwen3-30B-A3B shapes: 4.8 tok/s against 24.5). Not under
        # a budget (the cache may evict an expert once handed out), with an accelerator tier (it places experts
        # itself), or on the shared pool (it spins: one expert at a time on all its threads is faster).
        # Nor with fused MoE layers, which run a layer's experts in one call on the graphs' own threads.
        side_by_side = (1 < self.threads <= int(self.config.get("top_k") or 1)
                        and int(self.config["hidden_size"]) <= SIDE_BY_SIDE_MAX_HIDDEN
                        and budget is None and not self.device.accelerator and not shared_pool() and not fuse)
        # edge_moe's own kernels (native.py) run on OpenMP threads that sleep between calls after a short spin (a
        # longer one takes the core the next onnxruntime call or the readers need). On the shared pool, which spins
        # through them, on one thread. Streaming experts, on one thread fewer than --threads: the readers and their
        # checksums need a core, and with the cache's bookkeeping between expert calls every call woke a sleeping
        # thread (2-core VM, q3-f16e at budget 100%: 2 kernel threads decode 64-85 tok/s, prefill 195-202; 1 thread
        # 138 and 228).
        kernel_threads = 1 if shared_pool() else self.threads if everything else max(1, self.threads - 1)
        self.backbone = Backbone(manifest, self.clock, providers=self.device.providers,
                                 ort_device=self.device.ort_device, threads=1 if side_by_side else None,
                                 half_attention=half_attention, native_kernel=native_kernel,
                                 native_threads=kernel_threads)
        self.rss_baseline_bytes = rss_bytes()
        self.trace: list | None = [] if trace else None
        self.store = store_for(manifest, io_threads=io_threads, direct=direct_io, throttle=throttle)
        self.budget_note = None
        if spec.auto:  # after the backbone: its memory counts
            budget, self.budget_note = auto_budget(manifest, self.kernel)
        self.budget = None if spec.unlimited else self._budget_bytes(budget)
        self.closed = False
        self._chat_template = None
        self.batcher = None  # enable_batching
        # before experts load (sets their threads); float16 experts one at a time in the kernel, where it runs
        self.kernels = ExpertKernels(self.clock, parallel=side_by_side, native_threads=(
            1 if side_by_side else kernel_threads) if native else None)
        predictor = None
        if baseline == "mmap":
            self.experts = MmapExperts(manifest, trace=self.trace)
        elif baseline == "no-cache":
            self.experts = NoCacheExperts(manifest, self.store, trace=self.trace)
        elif baseline is not None:
            raise EdgeMoeError(f"baseline {baseline!r} is unknown; choose mmap or no-cache")
        elif self.budget is None:
            check_memory(full_budget(manifest, self.kernel), "keeping every expert resident", "pass --budget 25% "
                         "(budget=...) to stream experts from flash")
            from tqdm import tqdm  # here, not at the top: its import alone holds 3.6 MiB a budgeted run never uses

            with tqdm(total=len(manifest.experts), desc="load experts", unit="expert",
                      disable=not progress or fuse) as bar:
                self.experts = AllResidentExperts(manifest, self.store, bar, trace=self.trace, load=not fuse,
                                                  kernel=self.kernel)
        else:
            self.experts = ExpertCache(manifest, self.store, make_policy(policy), self.budget, trace=self.trace,
                                       kernel=self.kernel)
            predictor = NextLayerPredictor(manifest, depth=prefetch) if prefetch > 0 else None
        self.predictor = predictor
        self._predictors = {prefetch: predictor} if predictor else {}  # by depth: set_prefetch keeps what they learnt
        # With an accelerator, Forward gets experts and kernels through its tier (accelerator.py), which keeps
        # self.experts as the RAM tier behind it.
        self.accelerator = self.fused = None
        experts, kernels = self.experts, self.kernels
        bar = None
        if fuse:
            from tqdm import tqdm

            bar = tqdm(total=len(manifest.experts), desc="stack experts", unit="expert", disable=not progress)
            # every expert of every layer in one stacked tensor a layer, read straight from the package: no tier to
            # place them, and no per-expert copy beside the stacks
            store = self.store
            self.fused = FusedMoeLayers(manifest, lambda layer, e: stored_tensors(
                manifest.experts[(layer, e)], store.read((layer, e))), self.device, self.clock, bar,
                native_kernel=native_kernel, threads=kernel_threads)
        elif self.device.accelerator:
            self.accelerator = build_tier(self, gpu_budget, gpu_policy, cost_model, recalibrate, progress)
            experts, kernels = self.accelerator, self.accelerator.kernels
        self.step_graph = self._step_graph(step_graph, cuda_graph)
        if self.step_graph is not None:  # its session holds the backbone's weights: the per-layer ones go
            self.backbone.open_layers_on_use()
        if self.fused is not None and self.fused.quantized and self.step_graph is None:
            self.fused.open_all()
        if bar is not None:
            bar.close()
        self.forward = Forward(manifest, self.backbone, experts, kernels, predictor,
                               workers=0 if self.fused or not side_by_side else self.threads - 1, fused=self.fused,
                               step=self.step_graph)
        if self.accelerator is not None:
            self.forward.route_observers.append(self.accelerator.observe_routes)
        # resident weights onto 2 MiB pages in the background (huge_pages.py: 1.5-2x decode in a VM)
        self.huge_pages = HugePageKeeper(lambda: self.clock.calls) if huge_pages else None

    def _fuse(self, fused_moe: bool | None, baseline, gpu_budget, everything: bool, native: bool) -> bool:
        """Whether MoE layers run as one fused call each (fused_moe.py). Auto (None): on a real accelerator that
        holds every expert, and on the CPU for quantized experts and for float16 ones in edge_moe's kernel, when the
        kernel can express the family; True insists (any device, all resident). everything: no budget and no
        baseline (every expert resident); native: float16 experts that edge_moe's kernel may run."""
        if fused_moe is False:
            return False
        if fused_moe:
            if not everything:
                raise EdgeMoeError("fused_moe needs every expert resident: drop the budget (--budget) and baseline")
            if experts_run_quantized(self.manifest):
                check_memory(int(FUSED_LOAD_PEAK * self.manifest.expert_bytes), "loading the quantized experts "
                             "fused", "load them one session each (fused_moe=False, --no-fused-moe)")
            return True
        if unfusable_reason(self.manifest, self.device) is not None or not everything:
            return False
        if self.device.accelerator and self.device.ort_device != "cpu":
            return parse_gpu_budget(gpu_budget, self.manifest, self.kernel) >= self.manifest.expert_bytes
        # without an accelerator quantized experts fuse by default: QMoE runs a layer's experts 1.9x faster than
        # their MatMulNBits sessions one by one, with the same int8 activations (fused_moe.py); where the memory
        # allows its load, which holds the stacks beside onnxruntime's packed copy of them
        if self.device.accelerator:
            return False
        if experts_run_quantized(self.manifest):
            return FUSED_LOAD_PEAK * self.manifest.expert_bytes <= memory_headroom().nbytes
        # float16 experts fuse by default where edge_moe's own kernel runs (native.py: it reads the float16 bytes,
        # 1.8x onnxruntime's float32 stacks a layer at one token); its stacks are the experts' bytes, read one layer
        # at a time
        return native and self.manifest.expert_bytes <= memory_headroom().nbytes

    def _step_graph(self, step_graph: bool | None, cuda_graph: bool | None):
        """With fused MoE layers, embed and every layer as one graph (step_graph.py): auto (None) where the package
        allows it; True insists; False keeps one call a graph."""
        if step_graph is False or (self.fused is None and step_graph is None):
            return None
        reason = ("it needs fused MoE layers (fused_moe=True)" if self.fused is None
                  else "its experts run in edge_moe's own kernel, outside onnxruntime (native.py)"
                  if self.fused.native else unsupported_step_reason(self.manifest, self.backbone.routed))
        if reason is not None:
            if step_graph:
                raise EdgeMoeError(f"{self.manifest.root}: cannot run as one graph a token: {reason}")
            return None
        try:
            return StepGraph(self.manifest, self.backbone.half_attention, self.fused, self.clock,
                             threads=self.backbone.threads, cuda_graphs=cuda_graph)
        except EdgeMoeError:  # graphs that do not compose (mixed opsets, control flow): one call a graph then
            if step_graph:
                raise
            return None

    def pin(self, keys) -> None:
        """Keeps these (layer, index) experts resident for good (a budgeted model only). All or nothing: when one
        cannot be pinned, none of them is.

        Raises:
            EdgeMoeError: an unknown expert, or the pinned set leaves no room for a layer's top-k experts.
        """
        if self.budget is None:
            return  # all experts are resident anyway
        self.experts.pin(keys)

    def unpin(self, keys=None) -> None:
        """Lets these pinned experts (None: all) be evicted again."""
        if self.budget is not None:
            self.experts.unpin(self.experts.pinned.copy() if keys is None else keys)

    # Live controls: safe between tokens, or from another thread while one generation runs -----------------------

    def set_budget(self, budget) -> int:
        """Changes the RAM expert budget now; shrinking evicts down to it.

        Args:
            budget: bytes, '512MB', '2GiB', '25%' (of edge_moe.budget.share_total, as everywhere) or a Budget.
        Returns:
            The budget in bytes (also `model.budget`).

        Raises:
            EdgeMoeError: a malformed budget, one below the minimum, or a model loaded without a budget.
        """
        if self.budget is None or not hasattr(self.experts, "set_budget"):
            raise EdgeMoeError("this model keeps every expert resident (loaded without budget=); load it with a "
                               "budget, e.g. edge_moe.load(path, budget='100%'), to change the budget live")
        nbytes = self._budget_bytes(budget)
        self.experts.set_budget(nbytes)
        self.budget = nbytes
        return nbytes

    def set_policy(self, name: str) -> None:
        """Swaps the RAM cache's residency policy now ('lru', 'lfu', 'adaptive'); the new one learns from the
        experts resident now and the accesses that follow.

        Raises:
            EdgeMoeError: an unknown policy, or a model loaded without a budget (nothing is ever evicted).
        """
        policy = make_policy(name)
        if not hasattr(self.experts, "set_policy"):
            raise EdgeMoeError(f"policy {name!r} needs a budget: this model keeps every expert resident; load it "
                               "with one, e.g. edge_moe.load(path, budget='50%'), to change the policy live")
        self.experts.set_policy(policy)

    @property
    def policy(self) -> str | None:
        """The RAM cache's residency policy by name; None without a budget."""
        policy = getattr(self.experts, "policy", None)
        return None if policy is None else policy.name

    def residency(self) -> dict[tuple[int, int], str]:
        """Where the experts not only on flash are now, as a new dict (a tier may change the next moment):
        (layer, index) -> 'resident' (RAM), 'pinned' (RAM, kept for good), 'reading' (its read in flight) or 'gpu'
        (on the accelerator). Experts only on flash are absent; the mmap and no-cache baselines hold none."""
        if self.fused is not None:
            where = "gpu" if self.device.accelerator else "resident"
            return {key: where for key in self.manifest.experts}
        tier = self.accelerator if self.accelerator is not None else self.experts
        if hasattr(tier, "snapshot"):
            return tier.snapshot()
        if isinstance(self.experts, AllResidentExperts):
            return {key: "resident" for key in self.experts.experts}
        return {}

    def set_prefetch(self, depth: int) -> None:
        """Predicts and reads this many layers ahead from the next token on (0: off)."""
        depth = int(depth)
        if depth < 0:
            raise EdgeMoeError(f"prefetch {depth} is negative; use 0 (off) or the number of layers ahead")
        if depth and self.budget is not None and depth not in self._predictors:
            self._predictors[depth] = NextLayerPredictor(self.manifest, depth=depth)
        self.predictor = self.forward.predictor = self._predictors.get(depth) if depth else None

    def set_throttle(self, throttle) -> None:
        """Emulates a slower flash from the next read on (edge_moe.emulate.TokenBucket; None: this machine's)."""
        self.store.set_throttle(throttle)

    def enable_batching(self, max_batch: int = 16) -> None:
        """From now on, generations running at the same time (threads, server requests) decode together, up to
        `max_batch` per step: each routed expert is fetched once per step for all of them (edge_moe.batching).
        Each generation's tokens stay those it gets alone."""
        from .batching import ContinuousBatcher

        if self.batcher is None:
            self.batcher = ContinuousBatcher(self.forward, max_batch)

    def close(self) -> None:
        """Stops the flash readers and closes the package's files; the model cannot generate afterwards."""
        if not self.closed:
            self.closed = True
            if self.batcher is not None:
                self.batcher.close()
            if self.huge_pages is not None:
                self.huge_pages.close()
            self.forward.close()
            self.store.close()

    def settle(self, timeout: float | None = 60.0) -> None:
        """Waits for the background work that follows a load (resident weights moving onto huge pages), so that
        a benchmark times the steady state. Generating does not need it."""
        if self.huge_pages is not None:
            self.huge_pages.wait(timeout)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _budget_bytes(self, budget) -> int:
        """Parsed and checked (budget.parse_budget); above what every expert needs it clamps to that, with a
        one-line notice."""
        nbytes, full = parse_budget(budget, self.manifest, self.kernel), full_budget(self.manifest, self.kernel)
        if nbytes > full:
            print(f"edge-moe: budget {budget} is more than all experts need; using {full / 2**20:,.1f} MiB "
                  "(every expert fits)", file=sys.stderr)
        return min(nbytes, full)

    def expert_stats(self) -> dict:
        """Cache, flash and prefetch counters so far."""
        s = self.store.stats
        stats = {"bytes_read": s.bytes_read, "reads": s.reads, "read_seconds": s.read_seconds,
                 "read_busy_seconds": s.busy_seconds,
                 "checksum_seconds": s.checksum_seconds, "budget_bytes": self.budget,
                 "resident_bytes": self.fused.nbytes if self.fused else self.experts.resident_bytes()}
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
        if self.huge_pages is not None:
            stats.update(self.huge_pages.stats())
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

    @property
    def chat_template(self) -> ChatTemplate:
        """The package's chat template (tokenizer_config.json), or a plain one where it has none."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_package(self.manifest.root)
        return self._chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """messages [{"role", "content"}] -> prompt text, as transformers' apply_chat_template(tokenize=False)."""
        return self.chat_template.render(messages, add_generation_prompt, **variables)

    def encode_chat(self, messages, **variables) -> list[int]:
        """The rendered conversation as token ids (the template spells out its special tokens: none are added)."""
        if self.tokenizer is None:
            raise EdgeMoeError(f"{self.manifest.root}: the package has no tokenizer.json; chat needs one")
        return self.encode(self.tokenizer.encode(self.apply_chat_template(messages, **variables),
                                                 add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    # Inference ---------------------------------------------------------------------------------------

    def logits(self, input_ids) -> np.ndarray:
        """A fresh prefill of `input_ids`; returns float32 logits [len(input_ids), vocab]."""
        if self.closed:
            raise EdgeMoeError("the model was closed; load it again to run it")
        ids = self.encode(list(input_ids))
        self._check_context(len(ids))
        cache = self.forward.new_cache()
        return self.forward.logits(self.forward.hidden(np.asarray(ids, dtype=np.int64), cache))

    def stream_generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None, *, top_k: int = 0, min_p: float = 0.0,
                        repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                        frequency_penalty: float = 0.0, stop=None, logprobs: int | None = None,
                        prompt_cache: PromptCache | None = None):
        """Yields a GenerationResponse per generated token.

        Args:
            prompt: text, or a list of token ids.
            max_new_tokens: at most this many tokens (>= 1); generation also stops at an end-of-sequence token.
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_p, top_k, min_p: nucleus mass in (0, 1]; keep the k likeliest (0: all); drop tokens under
                min_p times the likeliest one's probability (0: off).
            repetition_penalty, presence_penalty, frequency_penalty: see `edge_moe.sampling.SamplingOptions`.
            seed: makes sampling reproducible.
            stop: a string or a list of strings; generation ends before the first one appears in the output text,
                which does not include it (finish_reason "stop").
            logprobs: report the model's log-probability of each token and of its N likeliest alternatives.
            prompt_cache: `model.prompt_cache()`; consecutive calls with it prefill only what follows the longest
                prefix they share with what it holds (a chat's next turn).
        Raises:
            EdgeMoeError: empty prompt, ids outside the vocabulary, bad sampling values, context too long.
        """
        ids, sampler, stop = self._request(prompt, max_new_tokens, temperature, top_p, seed, top_k, min_p,
                                           repetition_penalty, presence_penalty, frequency_penalty, stop, logprobs)
        eos = set(self.config.get("eos_token_ids") or [])
        sequence = Sequence(self.forward, ids, int(max_new_tokens), sampler, eos, StreamingDecoder(self.tokenizer),
                            stop=stop, logprobs=None if logprobs is None else int(logprobs), cache=prompt_cache)
        yield from (self.batcher.submit(sequence) if self.batcher is not None else stream_tokens(self.forward,
                                                                                                 sequence))

    def _request(self, prompt, max_new_tokens, temperature, top_p, seed, top_k, min_p, repetition_penalty,
                 presence_penalty, frequency_penalty, stop, logprobs):
        """Checks a generation request before any work; returns (prompt ids, sampler, stop strings)."""
        if self.closed:
            raise EdgeMoeError("the model was closed; load it again to generate")
        ids = self.encode(prompt)
        if int(max_new_tokens) < 1:
            raise EdgeMoeError(f"max_new_tokens (-n) is {max_new_tokens}; it must be at least 1")
        self._check_context(len(ids) + int(max_new_tokens))
        options = SamplingOptions(float(temperature), float(top_p), int(top_k), float(min_p),
                                  float(repetition_penalty), float(presence_penalty), float(frequency_penalty),
                                  None if seed is None else int(seed))
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if stop and self.tokenizer is None:
            raise EdgeMoeError(f"{self.manifest.root}: stop strings need the package's tokenizer.json; re-export "
                               "the model with its tokenizer or drop stop")
        if logprobs is not None and not 0 <= int(logprobs) <= 20:
            raise EdgeMoeError(f"logprobs {logprobs} is out of range; ask for 0 to 20 alternatives")
        return ids, Sampler(options), stop

    def prompt_cache(self) -> PromptCache:
        """A KV cache to pass to consecutive `stream_generate` calls of one conversation (see there)."""
        return PromptCache(self.forward)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, **options) -> GenerationResult:
        """Runs `stream_generate` to the end (same arguments); returns text, token ids and stats."""
        ids = self.encode(prompt)
        ort_before, calls_before = self.clock.seconds, self.clock.calls
        start = time.perf_counter()
        responses: list[GenerationResponse] = list(self.stream_generate(ids, max_new_tokens, temperature, top_p,
                                                                        seed, **options))
        total = time.perf_counter() - start
        tokens = [r.token for r in responses]
        last = responses[-1]
        decode_seconds = max(total - last.prefill_seconds, 1e-12)
        stats = {
            "prompt_tokens": len(ids), "generated_tokens": len(tokens), "cached_prompt_tokens": last.cached_tokens,
            "prefill_seconds": last.prefill_seconds, "decode_seconds": decode_seconds,
            "prefill_tokens_per_second": (len(ids) - last.cached_tokens) / max(last.prefill_seconds, 1e-12),
            "decode_tokens_per_second": (len(tokens) - 1) / decode_seconds if len(tokens) > 1 else 0.0,
            "ort_seconds": self.clock.seconds - ort_before, "ort_calls": self.clock.calls - calls_before,
            "total_seconds": total, "threads": self.threads,
            "rss_baseline_bytes": self.rss_baseline_bytes, "peak_rss_bytes": peak_rss_bytes(),
            **self.expert_stats(),
        }
        # with stop strings the text is what was streamed (cut before the stop); else the whole decode
        text = "".join(r.text for r in responses) if options.get("stop") else self.decode(tokens)
        logprobs = [(r.logprob, r.top_logprobs) for r in responses] if options.get("logprobs") is not None else None
        return GenerationResult(text, tokens, ids, last.finish_reason or "length", stats, logprobs)

    def _check_context(self, tokens: int) -> None:
        limit = int(self.config.get("max_position_embeddings") or 1 << 30)
        if tokens > limit:
            raise EdgeMoeError(f"prompt plus new tokens is {tokens}, over the model's context of {limit}; "
                               "shorten the prompt or lower -n")


def load(path: str | Path | None = None, **options) -> Model:
    """Opens a model package.

    Args:
        path: a directory written by `edge-moe export`; None or "default" opens the default model that ships with
            edge_moe (exported into the per-user cache on first use).
        threads: onnxruntime threads (default: physical cores); the first load in a process sets the pool.
        budget: None keeps every expert resident; else bytes, '512MB', '2GiB' or '25%' of the expert bytes
            bound what expert residency may use (weights, read buffers); experts stream from flash. 'auto': what
            the process may still use after loading the backbone (its memory cgroup's limit, page cache counted,
            else available RAM) less the KV cache of 512 tokens and 24 MiB; `model.budget_note` says how.
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
        thread_pool: 'per-session' (default; EDGE_MOE_THREAD_POOL sets another): each session its own sleeping
            pool, experts side by side on the threads; 'shared': one spinning pool for every onnxruntime session
            in the process, faster (sessions.py) but process-wide: onnxruntime then refuses any session that does
            not opt in, the embedding program's own too. The command line uses 'shared'. 'per-session-spinning':
            pools that spin while a call lasts, the default where edge_moe's kernels run (between the
            calls, on its own threads; on a shared pool created earlier in the process it runs on one thread).
        huge_pages: move resident weights onto 2 MiB pages in a background thread (Linux 6.1+; edge_moe.huge_pages;
            `model.settle()` waits for the first pass).
        fused_moe: run each MoE layer's routing and experts as one call over the layer's stacked weights
            (edge_moe.fused_moe: onnxruntime's MoE / QMoE, or edge_moe's own kernel). None (default): on an
            accelerator that holds every expert, and on the CPU for quantized experts and for float16 ones where
            edge_moe's kernel was built, where the family's router and experts allow it and every expert is
            resident; True: also for float32 experts (needs every expert resident); False: never.
        native_kernel: float16 and 8- / 4-bit weights on the CPU in edge_moe's own kernels (edge_moe.native: they
            read the package's bytes; onnxruntime has no CPU kernel that reads float16, and keeps its own packed copy
            of quantized blocks): fused or streamed experts, and a float16 or block-quantized backbone's embedding,
            layers and head where the family allows (edge_moe.native_layer; `backbone.native_reason` says why not).
            None (default): where they were built (resident quantized experts and backbones where the CPU has
            AVX-512 VNNI, streamed ones with AVX2 too); False:
            onnxruntime everywhere (the reference path); True insists on the fused experts' kernel.
        half_attention: "gqa" layer graphs attend in float16 with a float16 KV cache (edge_moe.layer_graphs).
            None (default): on an accelerator (onnxruntime's CUDA GroupQueryAttention has no float32 kernel) and
            where the experts run quantized (they quantize activations to int8 already; float16 attention reads
            half the cache: +7-14 % decode at 2,048 tokens of context); True: also on the CPU otherwise (half the KV
            cache's memory); False: never.
        step_graph: with fused MoE layers, embed and every layer composed into one graph at load (one onnxruntime
            call a token and the head's; edge_moe.step_graph). None (default): wherever the layer graphs route and
            attend with GroupQueryAttention; True insists; False: one call a graph.
        cuda_graph: with one graph a token on CUDA, decoded tokens replay a captured CUDA graph
            (edge_moe.step_graph.Replay). None (default): on CUDA; False: never; True on the CPU provider runs the
            same fixed-buffer step without capture (for tests).
    Returns:
        A Model.
    Raises:
        EdgeMoeError: the package is missing, corrupt or of an unsupported format version; a bad budget or policy.
    """
    from .default_model import resolve_model

    return Model(Manifest.load(resolve_model(path, progress=options.get("progress", True))), **options)
