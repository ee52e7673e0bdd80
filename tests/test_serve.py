"""The OpenAI-compatible server through the official `openai` client, in-process and as a subprocess: answers equal
the Python API's, streaming equals non-streaming, stop and penalties act as defined, concurrent requests equal the
same requests alone, bad requests get 4xx JSON and the server keeps serving, the API key is enforced."""

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time

import httpx  # the test extra installs httpx, openai and uvicorn: a missing one fails the suite, never skips it
import openai
import pytest
import uvicorn  # noqa: F401

import edge_moe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(shipped_package):
    return edge_moe.load(shipped_package)


def start(app):
    """uvicorn in a thread; returns (base url, stop())."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}/v1", stop


@pytest.fixture(scope="module")
def client(shipped_package):
    """A server whose model decodes concurrent requests together (the reference `model` runs each alone)."""
    from edge_moe.serve import create_app

    served = edge_moe.load(shipped_package)
    served.enable_batching(max_batch=4)
    url, stop = start(create_app(served, "default"))
    yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    stop()
    served.close()


MESSAGES = [{"role": "user", "content": "Write a function that reads a file."}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["default"]


def test_chat_equals_the_python_api_and_streaming_equals_whole(client, model):
    whole = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=12, temperature=0)
    reference = model.generate(model.encode_chat(MESSAGES), 12, stop=["User:"])
    assert whole.choices[0].message.content == reference.text
    assert whole.choices[0].finish_reason == reference.finish_reason
    assert whole.usage.prompt_tokens == len(model.encode_chat(MESSAGES)) and whole.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.text
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_stop_penalties_seed_and_logprobs(client, model):
    def complete(**kw):
        return client.completions.create(model="default", prompt="import os\n", max_tokens=16, **kw)

    plain = complete(temperature=0)
    assert plain.choices[0].text == model.generate("import os\n", 16).text
    stop = plain.choices[0].text[5:8]
    cut = complete(temperature=0, stop=[stop])
    assert cut.choices[0].text == plain.choices[0].text[:plain.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    penalized = complete(temperature=0, frequency_penalty=1.5, extra_body={"repetition_penalty": 1.3})
    assert penalized.choices[0].text == model.generate("import os\n", 16, frequency_penalty=1.5,
                                                       repetition_penalty=1.3).text
    assert penalized.choices[0].text != plain.choices[0].text
    sampled = [complete(temperature=0.9, seed=5, extra_body={"top_k": 20, "min_p": 0.05}).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1] == model.generate("import os\n", 16, temperature=0.9, seed=5, top_k=20,
                                                      min_p=0.05).text
    with_logprobs = complete(temperature=0, logprobs=2)
    reference = model.generate("import os\n", 16, logprobs=2)
    # within 1e-4: a prompt another request already ran comes from the server's prompt cache, prefilled in other
    # chunks than a fresh prefill (the float sums differ in the last bits)
    assert with_logprobs.choices[0].logprobs.token_logprobs == pytest.approx([lp for lp, _ in reference.logprobs],
                                                                            abs=1e-4)
    chat = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


def test_concurrent_requests_each_equal_alone(client, model):
    prompts = ["import os\n", "def main():", "class Foo:", "The json module", "x = [", "# A"]
    alone = [model.generate(p, 10 + i).text for i, p in enumerate(prompts)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda i: client.completions.create(
            model="default", prompt=prompts[i], max_tokens=10 + i, temperature=0).choices[0].text,
            range(len(prompts))))
    assert together == alone


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(client):
    base = str(client.base_url).rstrip("/")
    bad = httpx.post(f"{base}/completions", content=b"{not json")
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="default", prompt="x", temperature=-1)
    for max_tokens in ("many", 0):
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="default", prompt="x", max_tokens=max_tokens)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="default", messages=[])
    assert client.completions.create(model="default", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_api_key_is_enforced(model):
    from edge_moe.serve import create_app

    url, stop = start(create_app(model, "default", api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model="default", prompt="x", max_tokens=1).choices[0].text is not None
    finally:
        stop()


def test_serve_command_as_a_subprocess(shipped_package, model):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edge_moe.cli", "serve", "--model", shipped_package,
                                "--port", str(port), "--api-key", "k"], stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        deadline = time.time() + 60
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and process.poll() is None
                time.sleep(0.1)
        answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == model.generate(model.encode_chat(MESSAGES), 8,
                                                                   stop=["User:"]).text
    finally:
        process.terminate()
        process.wait(20)
    assert "serving" in process.stderr.read()


def test_serve_refuses_bad_arguments_before_loading():
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "edge_moe.cli", "serve", "--model", "/no/such", *args],
                              capture_output=True, text=True, timeout=60)

    result = serve("--port", "0")
    assert result.returncode == 2 and "--port 0" in result.stderr and "Traceback" not in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = serve("--port", str(taken.getsockname()[1]))
    # one line naming the address, and no model was loaded (the package does not even exist)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot listen" in result.stderr


def test_serve_takes_every_runtime_option_of_generate():
    from edge_moe.cli import build_parser

    def options(command):
        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
        return {o for a in sub._actions for o in a.option_strings}

    runtime = {"--model", "--budget", "--policy", "--prefetch", "--threads", "--emulate", "--device", "--gpu-budget",
               "--gpu-policy"}
    assert runtime <= options("serve") and runtime <= options("generate") and runtime <= options("chat")


def test_a_chat_turn_reuses_the_previous_requests_kv(client, model):
    first = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=10, temperature=0)
    history = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content.strip()},
                          {"role": "user", "content": "Now write to it."}]
    second = client.chat.completions.create(model="default", messages=history, max_tokens=10, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= len(model.encode_chat(MESSAGES))
    assert second.choices[0].message.content == model.generate(model.encode_chat(history), 10, stop=["User:"]).text
