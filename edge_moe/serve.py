"""`edge-moe serve` / `edge_moe.serve`: an OpenAI-compatible HTTP server (/v1/models, /v1/completions,
/v1/chat/completions, server-sent events) on Starlette + uvicorn (the optional extra `[serve]`).

Requests run in worker threads, each with its own KV cache and sampler. With batching (the default of `serve`)
the requests in flight decode together, one step for all (edge_moe.batching); without it the forward pass takes
one request's step at a time. Either way each request gets the tokens it would get alone.
"""

from __future__ import annotations

import json
import sys
import time

from .errors import EdgeMoeError
from .generate import PromptCachePool
from .openai_api import RequestError, chunks, parse, response


def _starlette():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgeMoeError("the server needs Starlette and uvicorn: pip install 'edge-moe[serve]'") from None


def create_app(model, model_name: str = "default", api_key: str | None = None, prompt_caches: int = 4):
    """A Starlette application serving `model` under `model_name`; with `api_key`, requests must send
    `Authorization: Bearer <api_key>`. The KV caches of the last `prompt_caches` requests are kept, so a request
    that continues one (a chat's next turn) prefills only its new tokens."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    turn_stop = model.chat_template.turn_stop() if model.tokenizer is not None else None
    caches = PromptCachePool(model.forward, prompt_caches)
    created = int(time.time())

    def error(exc: EdgeMoeError) -> JSONResponse:
        exc = exc if isinstance(exc, RequestError) else RequestError(str(exc))
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorized(request) -> bool:
        return api_key is None or request.headers.get("authorization", "") == f"Bearer {api_key}"

    async def models(request):
        if not authorized(request):
            return error(RequestError("invalid API key", status=401, code="invalid_api_key"))
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "edge_moe"}]})

    def endpoint(kind: str):
        async def handle(request):
            if not authorized(request):
                return error(RequestError("invalid API key", status=401, code="invalid_api_key"))
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                return error(RequestError(f"the body is not JSON ({exc})"))
            try:
                parsed = await run_in_threadpool(parse, body, kind, model, model_name, turn_stop)
            except EdgeMoeError as exc:
                return error(exc)
            cache = caches.take(parsed.prompt_ids)
            try:
                stream = model.stream_generate(parsed.prompt_ids, prompt_cache=cache, **parsed.options)
                # the first token is made before answering, so a request the model refuses gets a 4xx, not a
                # stream that breaks off
                first = await run_in_threadpool(next, stream)
            except EdgeMoeError as exc:
                caches.give(cache)
                return error(exc)
            if not parsed.stream:
                try:
                    rest = await run_in_threadpool(list, stream)
                finally:
                    caches.give(cache)
                return JSONResponse(response(parsed, model, model_name, [first, *rest]))

            def events():
                try:
                    for chunk in chunks(parsed, model, model_name, _chain(first, stream)):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    caches.give(cache)

            return StreamingResponse(events(), media_type="text/event-stream")  # iterated in a worker thread

        return handle

    async def not_found(request, exc):
        return error(RequestError(f"no route {request.method} {request.url.path}; see /v1/models", status=404))

    routes = [Route("/v1/models", models), Route("/v1/completions", endpoint("completion"), methods=["POST"]),
              Route("/v1/chat/completions", endpoint("chat"), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _chain(first, rest):
    yield first
    yield from rest


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 16, prompt_caches: int = 4, **load_options) -> None:
    """Serves a model until interrupted.

    Args:
        model: a loaded Model, a package path, or None / "default" for the shipped model.
        host: the address to listen on (127.0.0.1: this machine only). port: the TCP port.
        api_key: when set, requests must send `Authorization: Bearer <api_key>`.
        model_name: the id clients ask for (default: "default" for the shipped model, else the package's name).
        max_batch: requests decoded together per step (continuous batching, edge_moe.batching); 0: one at a time,
            interleaved token by token.
        prompt_caches: KV caches of recent requests kept for requests that continue them (0: none).
        load_options: edge_moe.load options (budget, policy, prefetch, threads, device, ...) when `model` is a path.
    Raises:
        EdgeMoeError: Starlette/uvicorn missing, the model cannot load, the port is taken.
    """
    _starlette()
    import uvicorn

    from . import __version__, load
    from .runtime import Model

    if not isinstance(model, Model):
        model = load(model, **load_options)
    shipped = model.manifest.root.name.startswith(f"default-{__version__}-")  # default_model's directory
    model_name = model_name or ("default" if shipped else model.manifest.root.name)
    if max_batch:
        model.enable_batching(max_batch)
    app = create_app(model, model_name, api_key, prompt_caches)
    print(f"edge-moe: serving {model_name!r} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run()
    except OSError as exc:  # e.g. the port is taken (uvicorn may also exit through SystemExit, below)
        raise EdgeMoeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    except SystemExit:
        raise EdgeMoeError(f"cannot listen on {host}:{port}; is the port taken? choose another --port") from None
    finally:
        model.close()


def check_address(host: str, port: int) -> None:
    """Refuses, before the model loads, an address this process cannot listen on. Raises EdgeMoeError."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(infos[0][4])
    except OSError as exc:
        raise EdgeMoeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") \
            from None


def add_arguments(p) -> None:
    from .cli import add_runtime_arguments

    add_runtime_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $EDGE_MOE_API_KEY if set)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together per step, sharing each expert read (0: no batching)")
    p.add_argument("--prompt-caches", type=int, default=4,
                   help="KV caches of recent requests kept, so a chat's next turn prefills only its new tokens")
    p.add_argument("--model-name", help="the model id clients use (default: 'default' or the package's name)")


def run(args) -> int:
    import os

    from .cli import check_runtime_arguments, runtime_model

    check_runtime_arguments(args)
    if not 0 < args.port < 65536:
        raise EdgeMoeError(f"--port {args.port}: use 1..65535")
    if args.max_batch < 0 or args.prompt_caches < 0:
        raise EdgeMoeError(f"--max-batch {args.max_batch} / --prompt-caches {args.prompt_caches}: use 0 (off) or "
                           "more")
    _starlette()
    check_address(args.host, args.port)
    with runtime_model(args, progress=True) as (model, _):
        serve(model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("EDGE_MOE_API_KEY"),
              model_name=args.model_name, max_batch=args.max_batch, prompt_caches=args.prompt_caches)
    return 0
