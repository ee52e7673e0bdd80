"""The OpenAI wire format, without HTTP: request bodies -> `Model.stream_generate` arguments, responses -> the
JSON objects and stream chunks of /v1/completions and /v1/chat/completions. Defaults follow OpenAI's (temperature 1,
max_tokens 16 for completions); top_k, min_p and repetition_penalty are the extensions vLLM and llama.cpp accept."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .errors import EdgeMoeError


class RequestError(EdgeMoeError):
    """A bad request: answered with this HTTP status and an OpenAI-style error object naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# name -> (type, default); None default: leave it to the model (stream_generate's own default)
_SAMPLING = {"temperature": (float, 1.0), "top_p": (float, 1.0), "top_k": (int, 0), "min_p": (float, 0.0),
             "repetition_penalty": (float, 1.0), "presence_penalty": (float, 0.0), "frequency_penalty": (float, 0.0),
             "seed": (int, None)}


@dataclass
class Request:
    """One parsed generation request."""

    kind: str  # "completion" or "chat"
    prompt_ids: list[int]
    options: dict  # keyword arguments of Model.stream_generate
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _typed(body: dict, name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"'{name}' must be a number, got {value!r}", name)
    return kind(value)


def parse(body, kind: str, model, model_name: str, turn_stop: str | None) -> Request:
    """Checks a request body (raises RequestError naming the field) and maps it onto the model."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("model") not in (model_name, None):
        raise RequestError(f"model {body.get('model')!r} is not served here; use {model_name!r} (GET /v1/models)",
                           "model", 404, "model_not_found")
    if _typed(body, "n", int, 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    options = {name: _typed(body, name, kind_, default) for name, (kind_, default) in _SAMPLING.items()}
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    stop = list(stop or [])
    if kind == "chat":
        limit = _typed(body, "max_completion_tokens", int, None) or _typed(body, "max_tokens", int, None)
        logprobs = _typed(body, "top_logprobs", int, 0) if body.get("logprobs") else None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content}", "messages")
        messages = [dict(m, content=_text_content(m.get("content"))) if isinstance(m, dict) else m for m in messages]
        ids = model.encode_chat(messages)
        stop += [turn_stop] if turn_stop else []
    else:
        limit = _typed(body, "max_tokens", int, 16)
        logprobs = _typed(body, "logprobs", int, None)
        if body.get("echo"):
            raise RequestError("'echo' is not supported", "echo")
        ids = model.encode(_prompt(body.get("prompt")))
    if limit is not None and limit < 1:
        raise RequestError(f"max_tokens {limit} must be at least 1", "max_tokens")
    limit = limit or max(1, int(model.config.get("max_position_embeddings") or 2048) - len(ids))
    stream_options = body.get("stream_options") or {}
    return Request(kind, ids, dict(options, max_new_tokens=limit, stop=stop, logprobs=logprobs),
                   stream=bool(body.get("stream")), include_usage=bool(stream_options.get("include_usage")),
                   logprobs=logprobs)


def _prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
        return prompt
    raise RequestError("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


def _text_content(content):
    """OpenAI content: a string or a list of parts; text parts are joined, others refused."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise RequestError("only text content parts are supported", "messages")
        return "".join(str(p.get("text", "")) for p in content)
    return content


# Responses -----------------------------------------------------------------------------------------------------

def usage(request: Request, responses) -> dict:
    last = responses[-1]
    return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(responses),
            "total_tokens": len(request.prompt_ids) + len(responses),
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}


def _chat_logprobs(model, responses) -> dict:
    def entry(token, logprob):
        text = model.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(entry(r.token, r.logprob), top_logprobs=[entry(t, v) for t, v in r.top_logprobs])
                        for r in responses]}


def _completion_logprobs(model, responses, offset: int = 0) -> dict:
    tokens = [model.decode([r.token]) for r in responses]
    offsets, at = [], offset
    for r in responses:
        offsets.append(at)
        at += len(r.text)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in responses],
            "top_logprobs": [{model.decode([t]): v for t, v in r.top_logprobs} for r in responses],
            "text_offset": offsets}


def _head(request: Request, model_name: str, chunk: bool) -> dict:
    prefix, obj = ("chatcmpl-", "chat.completion") if request.kind == "chat" else ("cmpl-", "text_completion")
    return {"id": prefix + request.id, "object": obj + (".chunk" if chunk and request.kind == "chat" else ""),
            "created": request.created, "model": model_name}


def response(request: Request, model, model_name: str, responses) -> dict:
    """The whole (non-streamed) answer."""
    text = "".join(r.text for r in responses)
    finish = responses[-1].finish_reason or "length"
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": _chat_logprobs(model, responses) if request.logprobs is not None else None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": _completion_logprobs(model, responses) if request.logprobs is not None else None}
    return dict(_head(request, model_name, False), choices=[choice], usage=usage(request, responses))


def chunks(request: Request, model, model_name: str, responses):
    """The streamed answer: one chunk per token (chat opens with the assistant role), the last with the finish
    reason, then usage where asked for."""
    seen, offset = [], 0
    if request.kind == "chat":
        yield dict(_head(request, model_name, True), choices=[
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
    for r in responses:
        seen.append(r)
        if request.kind == "chat":
            choice = {"index": 0, "delta": {"content": r.text} if r.text else {}, "finish_reason": r.finish_reason,
                      "logprobs": _chat_logprobs(model, [r]) if request.logprobs is not None else None}
        else:
            choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason,
                      "logprobs": _completion_logprobs(model, [r], offset) if request.logprobs is not None else None}
        offset += len(r.text)
        yield dict(_head(request, model_name, True), choices=[choice])
    if request.include_usage and seen:
        yield dict(_head(request, model_name, True), choices=[], usage=usage(request, seen))
