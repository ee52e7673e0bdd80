"""`edge-moe`: export, inspect, generate (and the benchmarks). User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys

from .errors import EdgeMoeError
from .lazy_imports import sigint_deferred


def _ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EdgeMoeError(f"--prompt-ids {text!r}: expected comma-separated integers like 1,2,3") from None


def cmd_export(args) -> int:
    from edge_moe_export.exporter import export_checkpoint

    import time

    from .telemetry import peak_rss_bytes

    start = time.perf_counter()
    bits = None if args.bits is None else (args.bits if args.bits == "mixed" else int(args.bits))
    out = export_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                            progress=not args.quiet, bits=bits, block_size=args.block_size,
                            zero_points=args.zero_points, expert_bytes=args.expert_bytes,
                            calibration=args.calibration, backbone_bits=args.backbone_bits,
                            attention=args.attention)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"peak RSS {peak_rss_bytes() / 2**20:,.1f} MiB")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in --help where it has a meaningful one."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def cmd_inspect(args) -> int:
    from .manifest import Manifest

    if args.routing:
        return inspect_routing(args)
    m = Manifest.load(args.model)
    c = m.config
    sizes = {e.length for e in m.experts.values()}
    summary = {
        "path": str(m.root), "family": m.family, "dtype": m.dtype, "layers": c["num_layers"],
        "moe_layers": len(c["moe_layers"]), "experts_per_layer": c["num_experts"], "top_k": c["top_k"],
        "experts": len(m.experts), "hidden_size": c["hidden_size"], "vocab_size": c["vocab_size"],
        "backbone_bytes": m.backbone_bytes, "expert_bytes": m.expert_bytes,
        "bytes_per_expert": sorted(sizes)[0] if len(sizes) == 1 else sorted(sizes),
        "tokenizer": m.tokenizer is not None,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    width = max(map(len, summary))
    for key, value in summary.items():
        if key.endswith("bytes") and isinstance(value, int):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        print(f"{key:<{width}}  {value}")
    return 0


def inspect_routing(args) -> int:
    from . import load
    from .bench.report import print_table
    from .evaluate import read_text_ids, routing_statistics

    if not args.text:
        raise EdgeMoeError("--routing needs --text FILE: the text whose routing is measured")
    model = load(args.model)
    ids = read_text_ids(model, args.text)
    rows = routing_statistics(model, ids, _window(model, args.window))
    if args.json:
        print(json.dumps({"tokens": len(ids), "layers": rows}))
    else:
        print_table(f"routing on {args.text} ({len(ids)} tokens; uniform entropy = 1, top25_share of uniform = "
                    "0.25)", rows)
    return 0


def _window(model, window: int | None) -> int:
    limit = int(model.config.get("max_position_embeddings") or 512)
    return min(window or limit, limit)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from . import load
    from .evaluate import evaluate, read_text_ids, unigram_perplexity

    model = load(args.model, **({"budget": args.budget} if args.budget else {}))
    ids = read_text_ids(model, args.text)
    reference = load(args.reference) if args.reference else None
    train = read_text_ids(model, args.unigram_text) if args.unigram_text else None
    with tqdm(total=len(ids), desc="eval", unit="tok", disable=args.json) as bar:
        result = evaluate(model, ids, _window(model, args.window), reference, bar)
    result["unigram_perplexity"] = unigram_perplexity(ids, model.config["vocab_size"], train)
    result["unigram_estimated_on"] = args.unigram_text or "the scored text itself (flatters the baseline)"
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"tokens {result['tokens']}  perplexity {result['perplexity']:.3f}  "
          f"unigram baseline {result['unigram_perplexity']:.3f} (estimated on {result['unigram_estimated_on']})")
    if reference is not None:
        print(f"mean KL(reference || model) per token: {result['mean_kl_vs_reference']:.5f} nats")
    return 0


def write_trace(path: str, trace: list) -> None:
    """JSON lines, one per (step, layer); written aside and renamed so a crash leaves no half file."""
    from .files import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in trace))


def add_runtime_arguments(p) -> None:
    """Options of `edge_moe.load` shared by generate and the benchmarks."""
    from .devices import DEVICE_CHOICES

    p.add_argument("--model", help="package directory, or 'default' (the default: the model that ships with "
                                   "edge_moe)")
    p.add_argument("--budget", help="memory for experts: bytes (512MB, 2GiB), a share of the expert bytes "
                                    "(25%%), or auto (what the memory cgroup or free RAM leaves after loading); "
                                    "default: every expert resident")
    p.add_argument("--policy", default="adaptive", help="residency policy under a budget: lru, lfu, adaptive")
    p.add_argument("--prefetch", type=int, default=2, help="layers ahead to prefetch speculatively (0: off)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: physical cores)")
    p.add_argument("--thread-pool", choices=("shared", "per-session"),
                   help="onnxruntime threads: one spinning pool for all sessions (default here), or a sleeping pool "
                        "per session with experts side by side (the library's default)")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="keep resident weights on 4 KiB pages (default: moved onto 2 MiB pages in the background)")
    p.add_argument("--fused-moe", action=argparse.BooleanOptionalAction, default=None,
                   help="each MoE layer's experts as one call over stacked weights (needs every expert resident); "
                        "default: on for an accelerator that holds every expert and on the CPU for quantized and "
                        "float16 experts, else off")
    p.add_argument("--native-kernel", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 and 8- / 4-bit weights on the CPU in edge_moe's own kernels, which read them as "
                        "stored: the experts, and for Qwen3-MoE, Qwen2-MoE, OLMoE and Mixtral the backbone too "
                        "(default: where they were built; resident quantized ones where the CPU has AVX-512 VNNI); "
                        "--no-native-kernel: onnxruntime (float32 copies of float16 weights, MatMulNBits / QMoE for "
                        "quantized ones)")
    p.add_argument("--step-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="with fused MoE layers, embed and every layer as one onnxruntime graph: one call a token "
                        "and the head's (default: where the package allows it)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="with one graph a token on CUDA, decoded tokens replay a captured CUDA graph (default: on)")
    p.add_argument("--emulate", metavar="PROFILE", help="run under a device profile's limits (threads, RAM budget, "
                                                        "flash bandwidth; a memory cgroup where allowed)")
    p.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                   help="where the backbone and the accelerator expert tier run (auto: accelerator if it loads)")
    p.add_argument("--gpu-budget", help="expert bytes on the accelerator (4GiB, or 25%%: the same bytes as "
                                        "--budget 25%%); default: all experts")
    p.add_argument("--gpu-policy", default="lfu", help="accelerator tier residency policy: lru, lfu, adaptive")


def add_sampling_arguments(p) -> None:
    """Sampling and stopping, shared by generate, chat and serve (edge_moe.sampling.SamplingOptions)."""
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else the softmax temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under min-p x the likeliest (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen (prompt and output; 1: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's presence penalty, -2..2")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's frequency penalty, -2..2")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")


def sampling_options(args) -> dict:
    """The keyword arguments of Model.stream_generate that add_sampling_arguments defined."""
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop)


def check_runtime_arguments(args) -> None:
    """Refuses bad runtime options before loading anything (add_runtime_arguments)."""
    if args.threads is not None and args.threads < 1:
        raise EdgeMoeError(f"--threads {args.threads}: use at least 1 (default: the physical cores)")
    if args.prefetch < 0:
        raise EdgeMoeError(f"--prefetch {args.prefetch}: use 0 (off) or the number of layers to look ahead")
    if args.gpu_budget is not None and args.device == "cpu":
        raise EdgeMoeError(f"--gpu-budget {args.gpu_budget} needs an accelerator; add --device cuda (or auto)")


def load_options(args) -> dict:
    return dict(threads=args.threads, budget=args.budget, policy=args.policy, prefetch=args.prefetch,
                device=args.device, gpu_budget=args.gpu_budget, gpu_policy=args.gpu_policy, huge_pages=args.huge_pages,
                thread_pool=args.thread_pool, fused_moe=args.fused_moe, step_graph=args.step_graph,
                cuda_graph=args.cuda_graph, native_kernel=args.native_kernel)


@contextlib.contextmanager
def emulation(args, model_path):
    """--emulate PROFILE: yields (load options the profile sets, report lines); explicit --threads and --budget win.
    The process memory limit (a cgroup, page cache included) holds for the block where the machine allows it."""
    if not getattr(args, "emulate", None):
        yield {}, []
        return
    from .emulate import emulation_options, memory_limit
    from .manifest import Manifest
    from .profiles import load_profile

    profile = load_profile(args.emulate)
    options, report = emulation_options(profile, Manifest.load(model_path))
    for name in ("threads", "budget"):
        if getattr(args, name, None) is not None:
            options.pop(name, None)
            report.append(f"  --{name} given: it replaces the profile's {name}")
    with memory_limit(profile.usable_ram_bytes) as limit:
        yield options, report + [limit.describe()]


@contextlib.contextmanager
def runtime_model(args, **extra):
    """Yields (the model that the runtime options ask for, --emulate's report lines), under the emulated
    device's limits for the block; notices (emulation, budget auto) go to stderr."""
    from . import load

    if args.emulate and args.model is None:
        from .default_model import default_model_path

        args.model = str(default_model_path())
    with emulation(args, args.model) as (emulated, report):
        for line in report:
            print(line, file=sys.stderr)
        model = load(args.model, **{**load_options(args), **emulated, **extra})
        if model.budget_note:
            print(model.budget_note, file=sys.stderr)
        yield model, report


def check_sampling_arguments(args) -> None:
    """Refuses sampling values out of range before loading anything (add_sampling_arguments)."""
    from .sampling import SamplingOptions

    SamplingOptions(**{k: v for k, v in sampling_options(args).items() if k != "stop"})


def cmd_generate(args) -> int:
    from .files import check_writable_path

    if (args.prompt is None) == (args.prompt_ids is None):
        raise EdgeMoeError("give either --prompt TEXT or --prompt-ids 1,2,3 (one of them)")
    if args.max_new_tokens < 1:
        raise EdgeMoeError(f"-n {args.max_new_tokens}: generate at least 1 token")
    check_runtime_arguments(args)
    check_sampling_arguments(args)
    if args.logprobs is not None and not args.json:
        raise EdgeMoeError("--logprobs is reported in the JSON output; add --json")
    if args.trace:
        check_writable_path(args.trace, "--trace")
    with runtime_model(args, trace=bool(args.trace)) as (model, report):
        generate(args, model, report)
    if args.trace:
        write_trace(args.trace, model.trace)
    return 0


def generate(args, model, report: list[str]) -> None:
    prompt = args.prompt if args.prompt is not None else _ids(args.prompt_ids)
    options = dict(max_new_tokens=args.max_new_tokens, **sampling_options(args))
    if args.json:
        result = model.generate(prompt, logprobs=args.logprobs, **options)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "prompt_ids": result.prompt_ids,
                          "finish_reason": result.finish_reason, "stats": result.stats,
                          **({"logprobs": result.logprobs} if result.logprobs is not None else {}),
                          **({"emulation": report} if report else {})}))
        return
    for response in model.stream_generate(prompt, **options):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        last = response
    sys.stdout.write("\n")
    stats = model.expert_stats()
    if model.fused is not None:  # every expert resident, stacked: nothing is fetched, so no hits to count
        experts = "experts fused" + (", one graph a token" if model.step_graph is not None else "")
    else:
        experts = f"expert hits {stats['hits']}/{stats['hits'] + stats['misses']}"
    print(f"[{last.prompt_tokens} prompt tokens, {last.index + 1} generated, decode {last.decode_tps:.1f} "
          f"tok/s, {experts}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="edge-moe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-moe {__version__}")
    # every command's help shows its defaults
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))

    p = sub.add_parser("export", help="export a Hugging Face MoE checkpoint (or a GGUF file) to an edge_moe package")
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory, or a .gguf file (pip install edge-moe[gguf])")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--bits", choices=["16", "8", "4", "2", "mixed"],
                   help="expert weights: float16, 8-, 4- or 2-bit MatMulNBits, or mixed per expert (default: --dtype)")
    p.add_argument("--block-size", type=int, default=32, help="weights per quantization scale (default 32)")
    p.add_argument("--zero-points", action="store_true", help="asymmetric quantization blocks (zero points)")
    p.add_argument("--expert-bytes", metavar="SIZE", help="--bits mixed: total expert size to fit (300MB, 1GiB)")
    p.add_argument("--calibration", metavar="FILE", help="--bits mixed: text whose routing and errors decide")
    p.add_argument("--attention", choices=["auto", "generic"], default="auto",
                   help="layer attention: auto (GroupQueryAttention with an in-place KV cache where possible) or "
                        "generic (plain ONNX ops; faster with --device cuda, which lacks a float32 GQA kernel)")
    p.add_argument("--backbone-bits", type=int, choices=[8, 4],
                   help="store attention projections and lm_head block-quantized (faster decode, small error)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("inspect", help="summarize a package (--routing: routing statistics on a text)")
    p.add_argument("model", help="package directory, or 'default' (the model that ships with edge_moe)")
    p.add_argument("--routing", action="store_true", help="expert popularity and reuse measured on --text")
    p.add_argument("--text", help="text file for --routing")
    p.add_argument("--window", type=int, help="tokens per prefill window (default: the model's context)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("eval", help="perplexity on a text against a unigram baseline (and KL to a reference)")
    p.add_argument("--model", help="package directory (default: the model that ships with edge_moe)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--reference", metavar="DIR", help="package to compare next-token distributions with (KL)")
    p.add_argument("--unigram-text", metavar="FILE", help="estimate the unigram baseline on this text")
    p.add_argument("--window", type=int, help="tokens per prefill window (default: the model's context)")
    p.add_argument("--budget", help="run under this expert memory budget")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help="generate text")
    add_runtime_arguments(p)
    p.add_argument("--trace", metavar="FILE", help="write JSON lines {step, layer, experts, hit} per MoE layer")
    p.add_argument("--prompt", help="the text to continue")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    add_sampling_arguments(p)
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json: each token's log-probability and its N likeliest alternatives")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, stats")
    p.set_defaults(run=cmd_generate)

    from edge_moe_export import synthetic

    from . import chat_command, planner, profiler, serve, verify
    from .bench import command as bench
    from .bench import soak

    # Commands that live in their own module, each with add_arguments(parser) and run(args).
    for name, module, help_text in (
        ("chat", chat_command, "talk to the model through its chat template (history, streaming, /reset)"),
        ("serve", serve, "an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, streaming)"),
        ("synth", synthetic, "write a random-weight Hugging Face MoE checkpoint (numpy, streaming)"),
        ("bench", bench, "benchmarks: decode speed and floors, the expert cache (prints tables, --json writes one)"),
        ("profile", profiler, "measure this machine (disk, memory, expert compute) and write a device profile"),
        ("plan", planner, "predict speed and memory on a device profile; recommend budget, policy, ..."),
        ("soak", soak, "a long generation under a budget (10k tokens at 25%% by default) with RSS sampled"),
        ("verify", verify, "check every byte of a package against its checksums and list what is wrong"),
    ):
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    try:
        with sigint_deferred():
            parser = build_parser()
            from . import runtime  # noqa: F401 - onnxruntime and numpy, before any command runs
        args = parser.parse_args(argv)
        if getattr(args, "model", None) == "default":  # a name for the shipped model wherever a package is asked
            from .default_model import resolve_model

            args.model = str(resolve_model(args.model))
        return args.run(args)
    except EdgeMoeError as exc:
        print(f"edge-moe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-moe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-moe generate ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


def console() -> int:
    """The `edge-moe` command: it owns its process, so onnxruntime runs on the shared spinning pool unless
    EDGE_MOE_THREAD_POOL says otherwise (edge_moe.sessions; a library caller keeps per-session pools)."""
    os.environ.setdefault("EDGE_MOE_THREAD_POOL", "shared")
    return main()


if __name__ == "__main__":
    sys.exit(console())
