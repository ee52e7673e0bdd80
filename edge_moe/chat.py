"""Chat templates: the checkpoint's Jinja `chat_template` (tokenizer_config.json, carried in the package), rendered
the way transformers' `apply_chat_template` renders it: a sandboxed environment with trim_blocks and lstrip_blocks,
loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the tokenizer's special
tokens (bos_token, eos_token, ...) as variables. A package without one gets PLAIN_TEMPLATE."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import EdgeMoeError

CONFIG_FILE = "tokenizer_config.json"
# For models trained without a chat format (the default model): role-labelled paragraphs.
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
                  "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value):
    """tokenizer_config.json writes a special token as text or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env


class ChatTemplate:
    """messages [{"role", "content"}] -> the prompt text the model was trained to continue."""

    def __init__(self, source: str, special_tokens: dict | None = None, origin: str = "chat template"):
        import jinja2

        self.source, self.origin = source, origin
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise EdgeMoeError(f"{origin}: the chat template does not parse ({exc}); fix or remove it") from None

    @classmethod
    def from_package(cls, root: Path) -> "ChatTemplate":
        """The package's tokenizer_config.json chat template (the one named 'default' where there are several),
        else PLAIN_TEMPLATE."""
        path = Path(root) / CONFIG_FILE
        if not path.is_file():
            return cls(PLAIN_TEMPLATE, origin="plain template")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EdgeMoeError(f"{path}: unreadable ({exc}); re-export the model") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        if not source:
            return cls(PLAIN_TEMPLATE, specials, origin="plain template")
        return cls(source, specials, origin=str(path))

    def render(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """The conversation as prompt text. Extra variables (tools, enable_thinking, ...) reach the template.

        Raises:
            EdgeMoeError: a message is not {"role": str, "content": ...}, or the template refuses the conversation
                (e.g. roles that do not alternate), with its own message.
        """
        import jinja2

        if not isinstance(messages, (list, tuple)) or not messages:
            raise EdgeMoeError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise EdgeMoeError(f"messages[{i}] is {message!r}; each message needs a 'role' and a 'content'")
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers drops None
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **variables})
        except jinja2.TemplateError as exc:
            raise EdgeMoeError(f"{self.origin}: the template refuses this conversation: {exc}") from None

    def turn_stop(self) -> str | None:
        """The visible text that opens the next user turn (e.g. 'User:' in the plain template): a model without
        an end-of-turn token writes it when it has finished answering. None where that text is empty."""
        marker = "\x00"
        try:
            text = self.render([{"role": "user", "content": marker}], add_generation_prompt=False)
        except EdgeMoeError:
            return None
        head = text.split(marker)[0]
        for token in self.special_tokens.values():
            head = head.replace(token, "")
        return head.strip() or None
