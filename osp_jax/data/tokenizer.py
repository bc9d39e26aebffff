"""Tokenizers behind one small interface: Hugging Face `tokenizer.json` or SentencePiece `.model`.

`load_tokenizer(path)` returns an object with `encode`, `encode_batch`, `decode`, `vocab_size`,
`eos_id`, `pad_id`, `path` and `sha256`. `train_bpe` trains the byte-level BPE this project ships.
`encode_documents` makes the records of documents (ids, EOS appended), and `text_file_documents` those
of a text file (evaluate's --data=FILE). Nothing here imports jax or grain, so the prepare CLI starts fast.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from osp_jax import cli, storage
from osp_jax.data import sources
from osp_jax.data.sources import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Names other tokenizers use for their end-of-document and padding tokens, in order of preference.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class TokenizerError(DataError):
    """A tokenizer that cannot be read or used (a user error: no traceback)."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_tokenizer_sha256(data_dir: str, meta: dict) -> tuple[str | None, str]:
    """sha256 of the tokenizer prepared data was tokenised with (what its metadata.json `meta` records,
    else its file's), and that file's path; None when neither is there."""
    path = os.fspath(epath.Path(data_dir) / str(meta.get("tokenizer") or "tokenizer.json"))
    return meta.get("tokenizer_sha256") or (file_sha256(path) if storage.is_file(path) else None), path


def run_tokenizer_sha256(workdir: str, name: str = "tokenizer.json") -> tuple[str | None, str | None]:
    """sha256 of the tokenizer a training run keeps, and its file: the one train copied into WORKDIR
    (named by its data_metadata.json, else `name`), else (file None) the `tokenizer_sha256` that
    data_metadata.json records; (None, None) when the run keeps neither. ValueError if data_metadata.json
    is not JSON."""
    path = run_tokenizer_path(workdir, names=(name,))
    if path is not None:
        return file_sha256(path), path
    meta = _run_data_metadata(workdir)
    return (str(meta["tokenizer_sha256"]) if meta.get("tokenizer_sha256") else None), None


def run_tokenizer_path(workdir: str, names=("tokenizer.json", "tokenizer.model")) -> str | None:
    """The tokenizer file train copied into WORKDIR (named by its data_metadata.json; without one, the
    first of `names` there), or None."""
    named = _run_data_metadata(workdir).get("tokenizer")
    names = [epath.Path(str(named)).name] if named else names
    return next((os.fspath(epath.Path(workdir) / n) for n in names if storage.is_file(epath.Path(workdir) / n)), None)


def _run_data_metadata(workdir: str) -> dict:
    meta_path = epath.Path(workdir) / "data_metadata.json"
    if not storage.is_file(meta_path):
        return {}
    return cli.read_json(meta_path, "the run's data metadata", error=ValueError)


class Tokenizer:
    """Common interface; see HFTokenizer and SentencePieceTokenizer."""

    kind: str = ""
    path: str
    vocab_size: int
    eos_id: int
    pad_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json. Special-token strings inside documents are encoded
    as plain text, so a document that happens to contain "<|endoftext|>" cannot end itself early."""

    kind = "hf"

    def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None):
        import tokenizers

        self.path = storage.normalized(path)
        try:
            with storage.local_copy(self.path) as local:
                self._tok = tokenizers.Tokenizer.from_file(local)
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
        try:
            self._tok.encode_special_tokens = True
        except AttributeError:  # tokenizers < 0.15
            pass
        self.vocab_size = _hf_vocab_size(self._tok)
        self.eos_id = self._find(eos_token, EOS_CANDIDATES, "end-of-document (EOS)", required=True)
        self.pad_id = self._find(pad_token, PAD_CANDIDATES, "padding", required=False)

    def _find(self, name, candidates, what, required):
        names = [name] if name else list(candidates)
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return int(i)
        if required:
            raise TokenizerError(f"tokenizer {self.path} has no {what} token: looked for {names}")
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        fast = getattr(self._tok, "encode_batch_fast", None)  # skips offsets: about 2x faster
        encs = (fast or self._tok.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _hf_vocab_size(tok) -> int:
    """Largest id + 1, added tokens included: the embedding rows a model needs. get_vocab_size() counts
    tokens instead, which is smaller when the ids have gaps."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` (needs `pip install sentencepiece`)."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError(f"reading the SentencePiece model {path} needs the sentencepiece "
                                 "package: pip install sentencepiece (or osp_jax[sentencepiece])") from None
        self.path = storage.normalized(path)
        try:
            with storage.local_copy(self.path) as local:
                self._sp = spm.SentencePieceProcessor(model_file=local)
        except Exception as e:
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise TokenizerError(f"tokenizer {path} has no end-of-document (EOS) token (eos_id is -1)")
        self.eos_id = eos
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def resolve_tokenizer_path(path: str) -> str:
    """A tokenizer file, or a directory holding tokenizer.json / tokenizer.model."""
    if storage.is_dir(path):
        for name in ("tokenizer.json", "tokenizer.model", "spiece.model"):
            p = os.fspath(epath.Path(path) / name)
            if storage.is_file(p):
                return p
        raise TokenizerError(f"tokenizer directory {path} has no tokenizer.json or tokenizer.model")
    if not storage.is_file(path):
        raise TokenizerError(f"tokenizer {path} not found (expected a tokenizer.json, a SentencePiece "
                             ".model, or train:VOCAB)")
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a Hugging Face tokenizer.json or a SentencePiece .model (a directory holding one works too)."""
    path = resolve_tokenizer_path(os.fspath(path))
    with epath.Path(path).open("rb") as f:
        head = f.read(64).lstrip()
    if path.endswith(".json") or head.startswith(b"{"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """Trains a byte-level BPE (GPT-2 style) with `<|endoftext|>` (id 0) and `<|pad|>` (id 1).

    Returns a `tokenizers.Tokenizer`; save it with `.save(path)`. Training is deterministic for a given
    text stream.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    n_special = 2
    if vocab_size < 256 + n_special:
        raise TokenizerError(f"train:{vocab_size}: a byte-level BPE needs a vocabulary of at least "
                             f"{256 + n_special} (256 bytes + 2 special tokens)")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# ----------------------------------------------------------------------------------------------------
# Documents as token records


def encode_documents(tok: Tokenizer, texts: Sequence[str], dtype="int32") -> list[np.ndarray]:
    """Each text's token ids with EOS appended, as little-endian `dtype`: the records prepare writes, the
    documents evaluate packs. TokenizerError for an id at or past `tok.vocab_size` (what metadata
    records, and what prepare's uint16/uint32 choice rests on)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    out = []
    for ids in tok.encode_batch(texts):
        top = max(ids, default=0)
        if top >= tok.vocab_size:
            raise TokenizerError(f"tokenizer {tok.path} produced id {top}, outside its vocabulary of "
                                 f"{tok.vocab_size}")
        a = np.empty(len(ids) + 1, dtype)
        a[:-1] = ids
        a[-1] = tok.eos_id
        out.append(a)
    return out


def iter_text_file_tokens(path: str, tokenizer, *, text_field: str = "text", batch_docs: int = 64,
                          skips: sources.SkipLog | None = None) -> Iterator[np.ndarray]:
    """Token arrays (int32, EOS appended) of each document of a .jsonl[.gz|.xz|.zst] / .txt / .parquet
    file (or glob); `tokenizer` is a path or a loaded tokenizer. Malformed records are skipped with a
    warning naming file:line (through `skips`, when given); a missing file raises osp_jax.data.DataError."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    chunk: list[str] = []
    for doc in sources.iter_documents(sources.expand_inputs(path), text_field, skips or sources.SkipLog(),
                                      split_field=None):
        chunk.append(doc.text)
        if len(chunk) >= batch_docs:
            yield from encode_documents(tok, chunk)
            chunk = []
    if chunk:
        yield from encode_documents(tok, chunk)


def text_file_documents(path: str, tokenizer, *, text_field: str = "text") -> list[np.ndarray]:
    """The token arrays (EOS at each end) of every document in the file(s); DataError when there is none, naming
    why (the first record skipped, or no record at all). The skipped records' warnings are printed after the file
    is read, and only when some document is left: else the error line says it."""
    warnings: list[str] = []
    skips = sources.SkipLog(warn=warnings.append)
    docs = list(iter_text_file_tokens(path, tokenizer, text_field=text_field, skips=skips))
    if not docs:
        skipped = sum(skips.counts.values())
        why = (f"{skipped} record(s) skipped; the first: {skips.first}" if skipped else
               "the file holds no record (empty, or blank lines only)")
        raise DataError(f"{path}: no valid documents: {why}")
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return docs


def text_file_tokens(path: str, tokenizer, *, text_field: str = "text") -> np.ndarray:
    """One EOS-separated int32 token stream of every document in the file(s)."""
    return np.concatenate(text_file_documents(path, tokenizer, text_field=text_field))
