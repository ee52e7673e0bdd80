"""tokenizer.json from a GGUF file's tokenizer.ggml.* metadata, built with the `tokenizers` library.

    tokenizer.ggml.model  gpt2 (byte-level BPE: Qwen, Llama 3, OLMoE)    -> BPE(tokens, merges) + byte-level
    tokenizer.ggml.pre    qwen2 | llama-bpe | olmo | gpt2 | default     -> the pre-tokenizer's split regex
    tokenizer.ggml.model  llama (SentencePiece BPE: Mixtral, Llama 2)   -> BPE with merges ranked by the merged
                          tokens, scores, add_space_prefix                piece's score, byte fallback, "▁" spaces
    tokenizer.ggml.token_type 3 (control) / 4 (user defined)             -> special / added tokens

SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the vocabulary piece of highest
score (llama.cpp's llm_tokenizer_spm does the same); a BPE whose merges are ranked by that score encodes alike
(transformers builds its Llama fast tokenizer the same way). SentencePiece unigram files are not converted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_moe.errors import EdgeMoeError

# The split regexes of the byte-level BPE tokenizers llama.cpp names (as their tokenizer.json files give them).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
PRE_TOKENIZER_REGEX = {
    "qwen2": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                                 r"\s+(?!\S)|\s+",
}
GPT2_STYLE = ("gpt2", "default", "olmo")  # the GPT-2 regex that tokenizers' ByteLevel applies itself
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # gguf.TokenType


def _contents(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def tokenizer_json(reader, path: Path) -> str | None:
    """The tokenizer.json text for this GGUF file, or None where it has no tokenizer we convert.

    Raises:
        EdgeMoeError: a byte-level BPE tokenizer with a pre-tokenizer this module does not know.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _contents(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind == "llama":
        tokenizer = _sentencepiece_bpe(reader)
        _add_bos_eos(tokenizer, reader, default_bos=True)
        return tokenizer.to_str()
    if kind != "gpt2":
        print(f"edge-moe: {path}: tokenizer.ggml.model {kind!r} is not converted yet (gpt2: byte-level BPE, llama: "
              "SentencePiece BPE); the package has no tokenizer and takes token ids", file=sys.stderr)
        return None
    pre = _contents(reader, "tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZER_REGEX and pre not in GPT2_STYLE:
        raise EdgeMoeError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                           f"{', '.join([*PRE_TOKENIZER_REGEX, *GPT2_STYLE])}")
    tokens = _contents(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _contents(reader, "tokenizer.ggml.merges") or []]
    types = _contents(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre == "llama-bpe"))
    if pre in PRE_TOKENIZER_REGEX:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    _add_special(tokenizer, tokens, types)
    _add_bos_eos(tokenizer, reader, default_bos=False)
    return tokenizer.to_str()


def _add_bos_eos(tokenizer, reader, default_bos: bool) -> None:
    """BOS / EOS around every encoded text where the file asks for them (tokenizer.ggml.add_bos_token; when it says
    nothing, llama.cpp adds BOS for SentencePiece vocabularies and not for byte-level BPE ones)."""
    from tokenizers import processors

    tokens = _contents(reader, "tokenizer.ggml.tokens")

    def added(key: str, default: bool) -> list[tuple[str, int]]:
        flag, index = (_contents(reader, f"tokenizer.ggml.{name}") for name in (f"add_{key}_token", f"{key}_token_id"))
        wanted = default if flag is None else bool(flag)
        return [(tokens[index], int(index))] if wanted and index is not None and 0 <= index < len(tokens) else []

    bos, eos = added("bos", default_bos), added("eos", False)
    if bos or eos:
        b, e = [t for t, _ in bos], [t for t, _ in eos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=[*b, "$A", *e], pair=[*b, "$A", *e, *b, "$B", *e], special_tokens=list(dict(bos + eos).items()))


def _add_special(tokenizer, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == USER_DEFINED])


def _sentencepiece_bpe(reader):
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = _contents(reader, "tokenizer.ggml.tokens")
    scores = _contents(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _contents(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    prefix = _contents(reader, "tokenizer.ggml.add_space_prefix")
    prefix = True if prefix is None else bool(prefix)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: -scores[i]):
        if types[i] != NORMAL:
            continue
        piece = tokens[i]
        pairs = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
        merges.extend(sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    unknown = next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unknown, fuse_unk=True,
                                     byte_fallback=True))
    spaces = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + spaces)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_special(tokenizer, tokens, types)
    return tokenizer
