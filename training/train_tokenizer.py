"""Train the byte-level BPE tokenizer of edge_moe's bundled model, then pre-tokenize the corpus.

Byte-level BPE (GPT-2 style) on the train split of training/corpus.py's output, with no normalizer and no
prefix space, so that decode(encode(text)) == text for any text: indentation, tabs, trailing spaces and
non-ASCII characters survive. `<|endoftext|>` (id 0) separates documents and is the model's bos/eos.

Writes tokenizer.json, and train.npy / heldout.npy (uint16 token ids, documents joined by <|endoftext|>)
for training/train_default_model.py.

    python training/train_tokenizer.py --corpus corpus --out .train
"""

import argparse
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
VOCAB_SIZE = 4096     # a few thousand: small embedding (tied) keeps the shipped checkpoint under 24 MB
MIN_FREQUENCY = 2


def build_tokenizer(train_text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    # use_regex keeps GPT-2's split (words, numbers, punctuation runs, whitespace runs) so merges never
    # cross a word boundary; add_prefix_space=False keeps the text exactly as given.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(train_text.split(EOT), trainer=trainer)
    return tok


def encode(tok: Tokenizer, text: str) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(text.split(EOT)):
        ids += enc.ids + [eot]
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="corpus", help="folder with train.txt and heldout.txt")
    ap.add_argument("--out", default=".train", help="folder for tokenizer.json, train.npy, heldout.npy")
    args = ap.parse_args()
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_text = (corpus / "train.txt").read_text(encoding="utf-8")
    tok = build_tokenizer(train_text)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() <= VOCAB_SIZE
    tok.save(str(out / "tokenizer.json"))

    for split in ("train", "heldout"):
        text = train_text if split == "train" else (corpus / "heldout.txt").read_text(encoding="utf-8")
        ids = encode(tok, text)
        # The round trip must be exact, or generated code would not be the code the model meant.
        sample = text.split(EOT)[:50]
        assert all(tok.decode(tok.encode(d).ids, skip_special_tokens=False) == d for d in sample)
        np.save(out / f"{split}.npy", ids)
        print(f"{split}: {len(ids):,} tokens, {len(text.encode()) / len(ids):.2f} bytes/token")
    print(f"vocab {tok.get_vocab_size()}; wrote {out}/")


if __name__ == "__main__":
    main()
