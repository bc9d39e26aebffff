"""Builds the corpus and tokenizer shipped in osp_jax/data/builtin/ (deterministic: same bytes every run).

    python tools/build_builtin.py [--corpus-dir=/work/shared/corpus] [--out=osp_jax/data/builtin]

What goes in (all public domain except the Python tutorial, PSF licence):
- Jane Austen, six novels (austen.jsonl.xz), all chapters;
- the King James Bible (kjv.jsonl.xz), all chapters;
- ten Shakespeare plays and the Sonnets (shakespeare.jsonl.xz);
- the Python tutorial pages of the Python 3.11 documentation (python_docs.jsonl.xz).

Documents longer than MAX_CHARS are cut at paragraph boundaries (blank lines) into chunks of at most
about MAX_CHARS, before the hold-out, so that validation gets enough text even from sources made of a
few long documents. Then every 50th chunk of each source (offset 25) is marked "validation", the rest
"train". The byte-level BPE (vocabulary 4096, `<|endoftext|>` = 0, `<|pad|>` = 1) is trained on the
train chunks only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from osp_jax.data.tokenizer import train_bpe  # noqa: E402

MAX_CHARS = 6000
HOLDOUT_EVERY = 50
HOLDOUT_OFFSET = 25
VOCAB_SIZE = 4096
SHAKESPEARE = ("HAMLET", "MACBETH", "ROMEO AND JULIET", "A MIDSUMMER NIGHT'S DREAM", "THE TEMPEST",
               "JULIUS CAESAR", "TWELFTH NIGHT", "THE TRAGEDY OF KING LEAR", "OTHELLO",
               "THE MERCHANT OF VENICE", "THE SONNETS")


def read(path: str) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def chunk_paragraphs(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Greedy: whole paragraphs per chunk until the next one would pass max_chars."""
    if len(text) <= max_chars:
        return [text]
    chunks, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if cur and size + len(para) + 2 > max_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return [c for c in chunks if c.strip()]


def select(corpus_dir: str) -> dict[str, list[str]]:
    docs = {
        "austen": [d["text"] for d in read(os.path.join(corpus_dir, "austen.jsonl.xz"))],
        "kjv": [d["text"] for d in read(os.path.join(corpus_dir, "kjv.jsonl.xz"))],
        "shakespeare": [d["text"] for d in read(os.path.join(corpus_dir, "shakespeare.jsonl.xz"))
                        if d["text"].lstrip().upper().startswith(SHAKESPEARE)],
        # The tutorial: pages whose first lines carry a `.. _tut-` label (and the page between them).
        "python_tutorial": [],
    }
    py = read(os.path.join(corpus_dir, "python_docs.jsonl.xz"))
    tut = [i for i, d in enumerate(py) if ".. _tut-" in d["text"][:300]]
    docs["python_tutorial"] = [py[i]["text"] for i in range(min(tut), max(tut) + 1)]
    return docs


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-dir", default="/work/shared/corpus")
    ap.add_argument("--out", default=os.path.join(here, "..", "osp_jax", "data", "builtin"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    records, train_texts = [], []
    stats = {}
    for source, texts in select(args.corpus_dir).items():
        chunks = [c for t in texts for c in chunk_paragraphs(t)]
        n_val = 0
        for i, c in enumerate(chunks):
            split = "validation" if i % HOLDOUT_EVERY == HOLDOUT_OFFSET else "train"
            n_val += split == "validation"
            records.append({"text": c, "source": source, "split": split})
            if split == "train":
                train_texts.append(c)
        stats[source] = {"documents": len(texts), "chunks": len(chunks), "validation_chunks": n_val,
                         "chars": sum(len(c) for c in chunks)}

    corpus = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    corpus_path = os.path.join(args.out, "corpus.jsonl.xz")
    with open(corpus_path, "wb") as f:
        f.write(lzma.compress(corpus, preset=9 | lzma.PRESET_EXTREME))

    tok = train_bpe(train_texts, VOCAB_SIZE)
    tok_path = os.path.join(args.out, "tokenizer.json")
    tok.save(tok_path, pretty=False)

    for source, s in stats.items():
        print(f"{source:16s} {s['documents']:5d} docs -> {s['chunks']:5d} chunks "
              f"({s['validation_chunks']} validation), {s['chars'] / 1e6:.2f} M chars")
    for p in (corpus_path, tok_path):
        data = open(p, "rb").read()
        print(f"{os.path.relpath(p)}: {len(data) / 1e6:.2f} MB sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"text: {len(corpus) / 1e6:.2f} MB, vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
