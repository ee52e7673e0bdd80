"""Build the training corpus for edge_moe's bundled model from the installed CPython standard library.

Licence: the CPython standard library sources and its documentation text are distributed under the
PSF License Agreement (the LICENSE.txt beside the stdlib; PSF-2.0, GPL-compatible, permits use,
modification and redistribution of derived works). The corpus itself is never committed: it is rebuilt
from the interpreter that runs this script, and manifest.json records that interpreter's version and a
SHA-256 of every file used, so a different Python gives a visibly different corpus. The shipped model
was trained on CPython 3.11.7's standard library.

What goes in, in sorted-path order (deterministic):
  * every *.py file of the stdlib, test suites included: they are ordinary Python under the same licence
    and triple the corpus (about 12 MB without them, about 29 MB with), which matters more for a model
    trained for many epochs than their repetitive assert style does;
  * the reference documentation that ships with the stdlib (pydoc_data/topics.py), unpacked into one
    plain-text document per topic instead of as Python string literals.
What stays out, and why:
  * site-packages (third-party code, other licences), __pycache__, config-*/ (build files);
  * files that are not UTF-8 or do not compile (test fixtures such as badsyntax_*.py, bad_coding*.py);
  * generated tables: the single-byte codec maps (encodings/cp*.py and friends) and files in which most
    bytes sit in lines longer than LONG_LINE characters (embedded data blobs) teach nothing about code.

Held-out split by document: every HOLDOUT_EVERY-th document (by sorted path) goes to heldout.txt.
Documents are joined by the end-of-text token; the tokenizer maps it to one special id.

    python training/corpus.py --out corpus
"""

import argparse
import ast
import hashlib
import json
import re
import sys
import sysconfig
import warnings
from pathlib import Path

EOT = "<|endoftext|>"
HOLDOUT_EVERY = 20          # document i is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
LONG_LINE = 200             # characters; lines longer than this are data, not code
MAX_LONG_LINE_SHARE = 0.25  # drop a file when this share of its characters is in long lines
SKIP_DIRS = {"site-packages", "__pycache__"}
CODEC_TABLE = re.compile(r"^encodings/(cp\d+|mac_\w+|iso8859_\d+|koi8_\w|kz1048|ptcp154|hp_roman8|palmos|tis_620)\.py$")
TOPICS = "pydoc_data/topics.py"


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        files.append(path)
    return files


def keep(rel: str, text: str) -> str | None:
    """Return why a file is dropped, or None to keep it."""
    if CODEC_TABLE.match(rel):
        return "codec table"
    long_chars = sum(len(line) for line in text.splitlines() if len(line) > LONG_LINE)
    if long_chars > MAX_LONG_LINE_SHARE * max(len(text), 1):
        return "long lines (data)"
    try:
        with warnings.catch_warnings():  # fixtures such as `1 is 1` warn; they still compile
            warnings.simplefilter("ignore")
            compile(text, rel, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return "does not compile"
    if EOT in text:
        return "contains the end-of-text marker"
    return None


def topic_documents(topics_py: Path) -> list[tuple[str, str]]:
    """pydoc's reference topics as plain text: parse the dict literal, never import or execute it."""
    tree = ast.parse(topics_py.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "topics":
            topics = ast.literal_eval(node.value)
            return [(f"{TOPICS}#{name}", topics[name]) for name in sorted(topics)]
    raise ValueError(f"no 'topics' dict in {topics_py}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library folder")
    ap.add_argument("--out", default="corpus", help="folder for train.txt, heldout.txt, manifest.json")
    args = ap.parse_args()
    root, out = Path(args.stdlib), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs, dropped = [], {}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if rel == TOPICS:
            docs += topic_documents(path)
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            dropped[rel] = "not UTF-8"
            continue
        reason = keep(rel, text)
        if reason:
            dropped[rel] = reason
        elif text.strip():
            docs.append((rel, text))
    docs.sort(key=lambda d: d[0])

    splits = {"train": [], "heldout": []}
    for i, (name, text) in enumerate(docs):
        splits["heldout" if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else "train"].append((name, text))
    manifest = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "licence": "PSF License Agreement (PSF-2.0), see LICENSE.txt in the stdlib folder",
        "holdout_every": HOLDOUT_EVERY,
        "dropped": dropped,
    }
    for split, items in splits.items():
        (out / f"{split}.txt").write_text(EOT.join(text for _, text in items), encoding="utf-8")
        manifest[split] = {name: hashlib.sha256(text.encode()).hexdigest()[:16] for name, text in items}
        print(f"{split}: {len(items)} documents, {sum(len(t.encode()) for _, t in items) / 1e6:.2f} MB")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(f"dropped {len(dropped)} files; Python {manifest['python']}; wrote {out}/")


if __name__ == "__main__":
    main()
