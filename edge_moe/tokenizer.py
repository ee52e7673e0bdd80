"""tokenizer.json through the `tokenizers` library, with incremental decoding for streaming."""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeMoeError


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HfTokenizer

        from .package_files import TOKENIZER_MAX_BYTES, read_capped

        raw = read_capped(path, TOKENIZER_MAX_BYTES, "tokenizer.json")  # never a FIFO, a device or a link
        try:
            self._tok = HfTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # the library raises a bare Exception on malformed files
            raise EdgeMoeError(f"{path}: cannot read the tokenizer ({exc}); re-export the model") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class StreamingDecoder:
    """Turns tokens into text pieces as they come, holding back a piece that ends inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
