"""`edge-moe chat`: an interactive conversation through the model's chat template, streamed, with history.
Each turn re-renders the whole conversation and the prompt cache prefills only what the last turn added."""

from __future__ import annotations

import sys

from .cli import add_runtime_arguments, add_sampling_arguments, check_runtime_arguments, check_sampling_arguments, \
    runtime_model, sampling_options
from .errors import EdgeMoeError

HELP = "commands: /reset (forget the conversation), /quit (or Ctrl-D)"


def add_arguments(p) -> None:
    add_runtime_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens per answer at most")
    p.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")


def run(args) -> int:
    check_runtime_arguments(args)
    check_sampling_arguments(args)
    with runtime_model(args) as (model, _):
        return converse(args, model)


def converse(args, model) -> int:
    options = sampling_options(args)
    turn_stop = model.chat_template.turn_stop()
    options["stop"] = (args.stop or []) + ([turn_stop] if turn_stop else [])
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history, cache = list(opening), model.prompt_cache()
    interactive = sys.stdin.isatty()
    print(f"edge-moe chat on {model.manifest.root.name} ({model.chat_template.origin}); {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        command = line.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            history, cache = list(opening), model.prompt_cache()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            answer, last = "", None
            for last in model.stream_generate(model.encode_chat(history), args.max_new_tokens, prompt_cache=cache,
                                              **options):
                answer += last.text
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except EdgeMoeError as exc:  # e.g. the conversation outgrew the context: the session goes on
            history.pop()
            print(f"\nedge-moe: error: {exc} (/reset starts over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})
        print(f"[{last.prompt_tokens - last.cached_tokens} new prompt tokens ({last.cached_tokens} cached) in "
              f"{last.prefill_seconds * 1e3:.0f} ms, {last.index + 1} tokens, {last.decode_tps:.1f} tok/s]",
              file=sys.stderr)
