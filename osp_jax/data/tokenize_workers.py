"""Tokenising prepare's documents: in this process, or in a pool of worker processes, in input order, with
a progress line. (prepare's single-machine path; the Beam path tokenises in its own DoFns.)
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from typing import Iterator

import numpy as np

from osp_jax.data import shards as shards_lib
from osp_jax.data import tokenizer as tokenizer_lib
from osp_jax.data.sources import Document

# Documents (or characters) handed to the tokenizer at once: large enough to amortise the call.
CHUNK_DOCS = 256
CHUNK_CHARS = 4 << 20


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    # Each worker is one process: keep the Rust tokenizer from starting a thread per core as well.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer_lib.load_tokenizer(tokenizer_path)


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    """`tokenizer.encode_documents` with this process's tokenizer, as the records' dtype."""
    tok = _WORKER_TOKENIZER
    return tokenizer_lib.encode_documents(tok, texts, shards_lib.token_dtype(tok.vocab_size))


def _chunks(docs: Iterator[Document]) -> Iterator[list[Document]]:
    chunk, chars = [], 0
    for d in docs:
        chunk.append(d)
        chars += len(d.text)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _tokenized(docs: Iterator[Document], tokenizer_path: str, workers: int):
    """Yields (Document, token array) in input order; `workers` > 1 tokenises in that many processes."""
    global _WORKER_TOKENIZER
    if workers <= 1:
        _WORKER_TOKENIZER = tokenizer_lib.load_tokenizer(tokenizer_path)
        for chunk in _chunks(docs):
            yield from zip(chunk, _encode_texts([d.text for d in chunk]))
        return
    # spawn: a forked copy of a process that already ran the Rust thread pool can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()  # bounded, so memory stays flat however large the input
        for chunk in _chunks(docs):
            pending.append((chunk, pool.apply_async(_encode_texts, ([d.text for d in chunk],))))
            if len(pending) >= 2 * workers:
                c, r = pending.popleft()
                yield from zip(c, r.get())
        while pending:
            c, r = pending.popleft()
            yield from zip(c, r.get())


class _Progress:
    """One stderr line with documents/s and tokens/s (redrawn on a terminal, every 10 s otherwise)."""

    def __init__(self, enabled: bool, files: int = 0):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.docs = self.tokens = 0
        self.files, self.file = files, 0  # inputs in all, and the one being read

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            self._print(end="\r" if self.tty else "\n")

    def _print(self, end: str) -> None:
        dt = max(time.monotonic() - self.t0, 1e-9)
        where = f"input {self.file}/{self.files}, " if self.files > 1 else ""
        sys.stderr.write(f"prepare: {where}{self.docs:,} docs, {self.tokens:,} tokens | "
                         f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tokens/s{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(end="\n")
