"""Chat templates render as transformers' apply_chat_template does, on copies of the supported families' real
templates (tests/data/chat_templates), and the exporter carries tokenizer_config.json into the package."""

import json
import shutil

import pytest

import edge_moe
from edge_moe.chat import PLAIN_TEMPLATE, ChatTemplate
from edge_moe.default_model import SHIPPED
from edge_moe.errors import EdgeMoeError

transformers = pytest.importorskip("transformers")

DATA = __import__("pathlib").Path(__file__).parent / "data" / "chat_templates"
FAMILIES = sorted(p.stem for p in DATA.glob("*.json"))
CONVERSATIONS = [
    [{"role": "user", "content": "Write fibonacci in Python."}],
    [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Hi ünïcode"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And then?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
     {"role": "user", "content": "3+3?"}],
]


def tokenizer_dir(tmp_path, family):
    """A Hugging Face tokenizer directory: the default model's tokenizer.json and the family's config."""
    config = {k: v for k, v in json.loads((DATA / f"{family}.json").read_text()).items() if not k.startswith("_")}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    directory = tmp_path / family
    directory.mkdir()
    shutil.copyfile(SHIPPED / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_equals_transformers(tmp_path, family):
    directory = tokenizer_dir(tmp_path, family)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    ours = ChatTemplate.from_package(directory)
    compared = 0
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            try:
                expected = reference.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt)
            except Exception as exc:  # the template refuses (e.g. Mixtral: no system role): so must we
                with pytest.raises(EdgeMoeError, match="refuses"):
                    ours.render(messages, add_generation_prompt)
                assert "roles" in str(exc)
                continue
            assert ours.render(messages, add_generation_prompt) == expected
            compared += 1
    assert compared >= 2


def test_qwen3_variables_reach_the_template(tmp_path):
    directory = tokenizer_dir(tmp_path, "qwen3_moe")
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    tools = [{"type": "function", "function": {"name": "add", "description": "adds", "parameters": {}}}]
    messages = CONVERSATIONS[0]
    assert ChatTemplate.from_package(directory).render(messages, tools=tools) == reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_package_carries_the_template(tiny_package, tmp_path):
    from edge_moe_export.exporter import export_checkpoint

    hf = tmp_path / "hf"
    shutil.copytree(tiny_package[1], hf)
    source = tokenizer_dir(tmp_path, "qwen2_moe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, hf / name)
    package = export_checkpoint(hf, tmp_path / "pkg", progress=False)
    model = edge_moe.load(package)
    reference = transformers.AutoTokenizer.from_pretrained(source)
    messages = CONVERSATIONS[1]
    assert model.apply_chat_template(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                                add_generation_prompt=True)


def test_plain_template_for_packages_without_one(tiny_package):
    model = edge_moe.load(tiny_package[0])
    assert model.chat_template.source == PLAIN_TEMPLATE
    text = model.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                      {"role": "user", "content": "and?"}])
    assert text == "User: hi\n\nAssistant: yo\n\nUser: and?\n\nAssistant:"
    assert model.chat_template.turn_stop() == "User:"


@pytest.mark.parametrize("messages", [[], [{"content": "x"}], ["hi"], None])
def test_bad_messages_are_one_line_errors(tiny_package, messages):
    with pytest.raises(EdgeMoeError, match="message"):
        edge_moe.load(tiny_package[0]).apply_chat_template(messages)


def run_chat(package, text, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edge_moe.cli", "chat", "--model", package, "-n", "16", *args],
                          input=text, capture_output=True, text=True, timeout=120)


def test_chat_command_history_prompt_cache_and_reset(shipped_package):
    import re

    model = edge_moe.load(shipped_package)
    first = [{"role": "user", "content": "hello there"}]
    answer = model.generate(model.encode_chat(first), 16, stop=["User:"]).text
    second = first + [{"role": "assistant", "content": answer.strip()}, {"role": "user", "content": "what is os?"}]
    follow = model.generate(model.encode_chat(second), 16, stop=["User:"]).text  # no prompt cache: the reference
    result = run_chat(shipped_package, "hello there\nwhat is os?\n/reset\nhello there\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{answer}\n{follow}\n{answer}\n"
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", result.stderr)]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0  # turn 2 reused turn 1's KV; /reset forgot it


def test_chat_turn_errors_keep_the_session(shipped_package):
    result = run_chat(shipped_package, "x" * 3000 + "\nhi\n")  # the first turn outgrows the context
    assert result.returncode == 0
    assert "edge-moe: error:" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("cached)") == 1  # the second turn answered
