"""Training data for v4jax: tokenizers, document readers and a packed, host-sharded, resumable
stream of batches for pre-training.

Tokenizers: `ByteTokenizer` (UTF-8 bytes plus DeepSeek's special strings; fits the tiny config's
vocab of 512) and `HFTokenizer` (any `tokenizer.json`, e.g. the released DeepSeek-V4 one);
`load_tokenizer(path_or_None)` picks one.

Documents: `iter_documents(path)` reads a .txt file (one document), a directory (every .txt/.md/.py
file below it, sorted; one document each), a .jsonl file (field "text" per line) or a .parquet
file (column "text", one row group at a time). Internally every source is cut into *chunks*
(one file; a byte range of a .jsonl, ~4 MiB; one parquet row group) that can be read independently.
A source that cannot be read (missing, damaged, a .jsonl line that is not UTF-8 JSON) is a `DataError`
(a ValueError) naming the file and, for .jsonl, the line; .txt/.md/.py bytes that are not UTF-8 become U+FFFD.

Batches: `PackedBatches` is built on grain (https://github.com/google/grain), whose iterators carry
a small checkpoint state:

    MapDataset.source(chunks).shuffle(seed).repeat()     chunk order, reshuffled each epoch
      .map_with_index(read chunk, shuffle its documents, tokenize: [BOS, ids.., EOS] each)
      .to_iter_dataset(read threads)
    FlatMapIterDataset                                   -> one {"tokens": [n]} per document
    ConcatThenSplitIterDataset(seq_len)                  -> rows of exactly S tokens + segments
    .batch(batch_size * process_count)                   -> one global batch
    .map(rows process_index::process_count)              -> this host's [B, S] share

So documents are shuffled at chunk level and then inside each chunk (for the default corpus every
file is a chunk, i.e. a full document-level shuffle). A document that does not fit into the rest of
a row continues in the next row as a new segment whose positions restart at 0 (no BOS there).
Hosts split every global batch by rows, so the global stream does not depend on the number of hosts
(each host tokenizes the whole stream and keeps its rows). `get_state()` is plain JSON; restoring
re-reads only the chunk(s) under the current row, never the stream from its start.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sysconfig
from typing import Iterator, NamedTuple, Sequence

import numpy as np

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "<think>", "</think>",
                  "｜DSML｜", "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>",
                  "<｜read_url｜>", "<｜extracted_url｜>", "<tool_result>", "</tool_result>")
BYTE_BASE = 2 + len(SPECIAL_TOKENS)  # byte b has id BYTE_BASE + b
DOC_SUFFIXES = (".txt", ".md", ".py")
JSONL_CHUNK_BYTES = 1 << 22
_STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "site-packages"})


class DataError(ValueError):
    """A document source that cannot be read (missing, unknown format, damaged, not UTF-8); the message
    names the file. A ValueError, as train.py and the trainer report them (exit 2, one line)."""


# ----------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """Byte-level tokenizer: 0 = BOS, 1 = EOS, 2.. = SPECIAL_TOKENS, BYTE_BASE + b = byte b."""

    bos_id, eos_id = 0, 1

    def __init__(self):
        self.specials = (BOS, EOS, *SPECIAL_TOKENS)
        self._ids = {s: i for i, s in enumerate(self.specials)}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @property
    def vocab_size(self) -> int:
        return BYTE_BASE + 256

    def token_id(self, special: str) -> int:
        return self._ids[special]

    def _encode_array(self, text: str) -> np.ndarray:
        """[n] int32 ids; special strings anywhere in `text` become their own id."""
        parts = []
        for i, piece in enumerate(self._split.split(text)):  # odd pieces are the specials
            if i % 2:
                parts.append(np.array([self._ids[piece]], np.int32))
            elif piece:
                parts.append(np.frombuffer(piece.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_BASE)
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One [n_i] int32 array per text (no BOS/EOS added)."""
        return [self._encode_array(t) for t in texts]

    def decode(self, ids) -> str:
        """Specials decode to their strings; invalid UTF-8 is replaced by U+FFFD."""
        out, buf = [], bytearray()
        for t in map(int, ids):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} outside the vocabulary [0, {self.vocab_size})")
            if t >= BYTE_BASE:
                buf.append(t - BYTE_BASE)
                continue
            out.append(buf.decode("utf-8", "replace"))
            buf.clear()
            out.append(self.specials[t])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the ByteTokenizer interface (no BOS/EOS added)."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.path = os.fspath(path)
        self._tok = Tokenizer.from_file(self.path)
        self.bos_id = self._tok.token_to_id(BOS)
        self.eos_id = self._tok.token_to_id(EOS)
        self.bos_id = 0 if self.bos_id is None else self.bos_id
        self.eos_id = 1 if self.eos_id is None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, special: str) -> int:
        i = self._tok.token_to_id(special)
        if i is None:
            raise KeyError(f"{special!r} is not in {self.path}")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One [n_i] int32 array per text; the Rust side encodes them in parallel."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path=None, default=None):
    """HFTokenizer(path) for a given `path`, which must be a tokenizer.json file; without one,
    HFTokenizer(default) when `default` (e.g. a checkpoint's tokenizer.json) exists, else ByteTokenizer."""
    from .validate import ConfigError

    if path is None:
        if default is None or not os.path.isfile(default):
            return ByteTokenizer()
        path = default
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a tokenizer.json file" if os.path.isdir(path) else "no such file"
        raise ConfigError(f"tokenizer {path}: {what}")
    try:
        return HFTokenizer(path)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
        raise ConfigError(f"tokenizer {path}: not a readable tokenizer.json ({e})") from None


# ------------------------------------------------------------------------------------ documents
class Chunk(NamedTuple):
    """An independently readable piece of a source."""
    kind: str       # "file" (one document), "jsonl" or "parquet"
    path: str
    start: int = 0  # jsonl: first byte (lines starting in [start, stop)); parquet: row group
    stop: int = 0


def list_chunks(path, jsonl_chunk_bytes: int = JSONL_CHUNK_BYTES) -> list[Chunk]:
    """The chunks of one source (file or directory), in their natural order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                 if n.endswith(DOC_SUFFIXES)]
        return [Chunk("file", f) for f in sorted(files)]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such document source (file or directory)")
    if path.endswith(DOC_SUFFIXES):
        return [Chunk("file", path)]
    if path.endswith(".jsonl"):
        size, n = os.path.getsize(path), jsonl_chunk_bytes
        return [Chunk("jsonl", path, s, min(s + n, size)) for s in range(0, size, n)]
    if path.endswith(".parquet"):
        return [Chunk("parquet", path, g) for g in range(_parquet_file(path).num_row_groups)]
    raise DataError(f"{path}: unknown document format (expected a directory, "
                    f".txt/.md/.py, .jsonl or .parquet)")


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (only computed for error messages)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            count, offset = count + block.count(b"\n"), offset - len(block)
    return count + 1


def _read_jsonl(chunk: Chunk) -> list[str]:
    docs = []
    with open(chunk.path, "rb") as f:
        if chunk.start:  # skip the rest of a line that began in the previous chunk
            f.seek(chunk.start - 1)
            f.readline()
        while (pos := f.tell()) < chunk.stop and (line := f.readline()):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise DataError(f"{chunk.path}:{_line_number(chunk.path, pos)}: not UTF-8 (byte "
                                f"0x{line[e.start]:02x} at column {e.start + 1})") from None
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataError(f"{chunk.path}:{_line_number(chunk.path, pos)}: invalid JSON "
                                f"({getattr(e, 'msg', 'nested too deeply')})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{chunk.path}:{_line_number(chunk.path, pos)}: "
                                f"no string field 'text'")
            docs.append(record["text"])
    return docs


def _parquet_file(path: str):
    """pyarrow's ParquetFile, or a DataError naming `path` (pyarrow's own messages do not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _read_parquet(chunk: Chunk) -> list[str]:
    import pyarrow as pa
    pf = _parquet_file(chunk.path)
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{chunk.path}: no column 'text'")
    try:
        texts = pf.read_row_group(chunk.start, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{chunk.path}: row group {chunk.start} is not readable ({e})") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"{chunk.path}: row group {chunk.start}, row {i}: 'text' is {repr(t)[:80]}")
    return texts


def read_chunk(chunk: Chunk) -> list[str]:
    """The documents of one chunk, in file order."""
    try:
        if chunk.kind == "file":  # one document; bytes that are not UTF-8 become U+FFFD
            with open(chunk.path, "rb") as f:
                return [f.read().decode("utf-8", "replace")]
        return _read_jsonl(chunk) if chunk.kind == "jsonl" else _read_parquet(chunk)
    except OSError as e:
        raise DataError(f"{chunk.path}: cannot read it ({e.strerror or e})") from None


def iter_documents(path) -> Iterator[str]:
    """Every document of one source (see module docstring for the formats), in file order."""
    for chunk in list_chunks(path):
        yield from read_chunk(chunk)


def default_corpus_files(max_bytes: int | None = None) -> list[str]:
    """The standard library's own .py files on this machine (sorted; no tests, idlelib or
    site-packages), the first ones up to about `max_bytes` in total when it is given."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _STDLIB_SKIP]
        files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    files.sort()
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}")
    if max_bytes is not None:
        sizes = np.cumsum([os.path.getsize(f) for f in files])
        files = files[:max(1, int(np.searchsorted(sizes, max_bytes)) + 1)]
    return files


# -------------------------------------------------------------------------------------- packing
def _to_json(x):
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def _from_json(x):
    """grain compares some state entries with tuples; JSON turned them into lists."""
    if isinstance(x, dict):
        return {k: _from_json(v) for k, v in x.items()}
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


def _load_chunk(tokenizer, seed: int, align: int, index: int, chunk: Chunk) -> list[np.ndarray]:
    """Documents of `chunk` (the `index`-th chunk of the endless stream) in a shuffled order,
    each as int32 [BOS, ids.., EOS, EOS padding up to a multiple of `align`]; empty ones dropped."""
    docs = [d for d in read_chunk(chunk) if d]
    order = np.random.default_rng([seed, index]).permutation(len(docs))
    ids = tokenizer.encode_batch([docs[i] for i in order]) if docs else []
    bos, eos = np.array([tokenizer.bos_id], np.int32), np.array([tokenizer.eos_id], np.int32)
    docs = [np.concatenate([bos, x.astype(np.int32), eos]) for x in ids]
    return [np.pad(d, (0, -len(d) % align), constant_values=tokenizer.eos_id) for d in docs]


def _host_rows(process_index: int, process_count: int, batch: dict) -> dict:
    """Global batch [B*P, S] -> this host's rows [B, S] (rows process_index, +P, +2P, ...)."""
    take = lambda k: np.ascontiguousarray(batch[k][process_index::process_count], np.int32)
    return {"tokens": take("tokens"), "segment_ids": take("tokens_segment_ids"),
            "positions": take("tokens_positions")}


def _make_documents_flatmap(n_chunks: int):
    import grain.experimental

    class Documents(grain.experimental.FlatMapTransform):
        """Chunk -> its documents as {"tokens": [n]}; fails after an epoch of empty chunks."""
        max_fan_out = 1 << 30  # only used by MapDataset flat maps

        def __init__(self):
            self.empty_run = 0

        def flat_map(self, docs):
            self.empty_run = 0 if docs else self.empty_run + 1
            if self.empty_run > n_chunks:
                raise ValueError("the corpus has no non-empty documents")
            return [{"tokens": d} for d in docs]

    return Documents()


class PackedBatches:
    """Endless, deterministic, checkpointable batches of packed documents for one host.

    Yields {"tokens", "segment_ids", "positions"}: int32 [batch_size, seq_len] numpy arrays. Every
    row is full; segment_ids number the document pieces of a row from 1; positions restart at 0
    in every segment. `sources` is a path or a list of paths (see `list_chunks`); the global
    batch is batch_size * process_count rows, of which host `process_index` keeps every
    process_count-th. `read_threads` threads read and tokenize up to `prefetch` chunks ahead.

    `align`: every document is padded with EOS to a multiple of `align` tokens (and seq_len must be
    one), so documents start at multiples of every compression ratio and no compressed block ever
    holds two documents (v4jax's choice where the spec leaves packed-document compression open;
    the padding is masked out of the loss: nothing is predicted after an EOS).
    """

    def __init__(self, sources, tokenizer, batch_size: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, *, align: int = 1, read_threads: int = 4,
                 prefetch: int = 16, jsonl_chunk_bytes: int = JSONL_CHUNK_BYTES):
        import grain
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        chunks = [c for s in sources for c in list_chunks(s, jsonl_chunk_bytes)]
        if not chunks:
            raise ValueError(f"no documents in {list(sources)}")
        if min(batch_size, seq_len, process_count) < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad batch_size={batch_size}, seq_len={seq_len} or "
                             f"process {process_index}/{process_count}")
        if align < 1 or seq_len % align:
            raise ValueError(f"seq_len={seq_len} must be a multiple of align={align}")
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self._config = [seed, batch_size, seq_len, process_index, process_count, len(chunks), align]
        load = functools.partial(_load_chunk, tokenizer, seed, align)
        ds = grain.MapDataset.source(chunks).shuffle(seed=seed).repeat().map_with_index(load)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                  prefetch_buffer_size=prefetch))
        it = grain.experimental.FlatMapIterDataset(it, _make_documents_flatmap(len(chunks)))
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len})
        it = it.batch(batch_size * process_count, drop_remainder=True)
        self._dataset = it.map(functools.partial(_host_rows, process_index, process_count))
        self._iter = iter(self._dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """Plain JSON (ints, strings, lists, dicts): where the stream is now."""
        return {"version": 1, "config": list(self._config), "grain": _to_json(self._iter.get_state())}

    def set_state(self, state: dict) -> None:
        """Continue exactly where the iterator that produced `state` was (same arguments)."""
        if state.get("version") != 1 or list(state.get("config", [])) != self._config:
            raise ValueError(f"data state {state.get('config')} does not match this pipeline "
                             f"[seed, batch, seq_len, process, processes, chunks, align] = {self._config}")
        self._iter.set_state(_from_json(state["grain"]))


class StagedBatches:
    """The batches of a run whose sequence length may change between steps (`seq_stages`).

    One `PackedBatches` stream packs the documents into rows of `base` tokens (the gcd of the stage
    lengths), `rows` x process_count rows per pull (the global batch; every host reads the whole
    stream, as PackedBatches itself does, and keeps rows process_index::process_count). A batch of
    sequence length S = r * base joins r pulls: r consecutive rows of the stream become one row, and a
    document cut where two rows meet continues in the same segment with its positions running on.
    Packing is concatenate-then-split, so that is exactly the batch a stream packed at S would give
    (tests/test_train_options.py); the only state is the one stream's, so `get_state` / `set_state`
    resume anywhere, a stage boundary included, and stages can be added when resuming as long as the
    gcd of their lengths stays the same. (A continuation is recognised by not starting with BOS; a
    document piece that starts with a literal BOS token in its text is kept as its own segment.)"""

    def __init__(self, sources, tokenizer, rows: int, seq_lens, seed: int, process_index: int = 0,
                 process_count: int = 1, *, align: int = 1):
        self.base = functools.reduce(math.gcd, seq_lens)
        self.bos_id = tokenizer.bos_id
        self.process_index, self.process_count = process_index, process_count
        self.stream = PackedBatches(sources, tokenizer, rows * process_count, self.base, seed, align=align)

    def take(self, seq_len: int) -> dict:
        """This host's next batch, int32 [rows, seq_len] each."""
        if seq_len % self.base:
            raise ValueError(f"sequence length {seq_len} is not a multiple of {self.base}")
        r = seq_len // self.base
        pulls = [next(self.stream) for _ in range(r)]
        batch = join_rows({k: np.concatenate([p[k] for p in pulls]) for k in pulls[0]}, r, self.bos_id)
        return {k: np.ascontiguousarray(v[self.process_index::self.process_count]) for k, v in batch.items()}

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state)


def join_rows(batch: dict, r: int, bos_id: int) -> dict:
    """Packed rows [N * r, L] in stream order -> [N, r * L]: every r consecutive rows joined, a piece of
    a document that does not start with BOS merged into the previous row's last segment."""
    tok, seg, pos = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions"))
    n, length = tok.shape[0] // r, tok.shape[1]
    tok, seg, pos = (x.reshape(n, r, length).copy() for x in (tok, seg, pos))
    for j in range(1, r):
        cont = tok[:, j, 0] != bos_id  # [N]: the row starts inside a document
        seg[:, j] += (seg[:, j - 1, -1] - cont.astype(seg.dtype))[:, None]
        first = cont[:, None] & (seg[:, j] == seg[:, j - 1, -1][:, None])
        pos[:, j] += np.where(first, pos[:, j - 1, -1][:, None] + 1, 0).astype(pos.dtype)
    return {"tokens": tok.reshape(n, r * length), "segment_ids": seg.reshape(n, r * length),
            "positions": pos.reshape(n, r * length)}
