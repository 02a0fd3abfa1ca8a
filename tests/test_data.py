"""Data pipeline: tokenizers, document readers, packing invariants, determinism, resume, sharding."""
import json
import os
import string

import numpy as np
import pytest

from v4jax import data as D

LETTERS = string.ascii_letters  # doc i is LETTERS[i] * length: every token names its document


def _letter_corpus(tmp_path, lengths):
    """A directory of .txt documents, doc i = LETTERS[i] * lengths[i]; returns (dir, docs)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = [LETTERS[i] * n for i, n in enumerate(lengths)]
    for i, doc in enumerate(docs):
        (root / ("sub" if i % 3 == 0 else "") / f"d{i:02d}.txt").write_text(doc)
    return root, docs


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    tok = D.ByteTokenizer()
    assert D.BYTE_BASE == 17 and tok.vocab_size == D.BYTE_BASE + 256 <= 512
    assert (tok.bos_id, tok.eos_id) == (0, 1) == (tok.token_id(D.BOS), tok.token_id(D.EOS))
    assert [tok.token_id(s) for s in D.SPECIAL_TOKENS] == list(range(2, D.BYTE_BASE))
    text = "<｜User｜>héllo, 世界 🙂<think>x</think>｜DSML｜<tool_result>ok</tool_result><｜Assistant｜>"
    ids = tok.encode(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == tok.token_id("<｜User｜>") and ids[-1] == tok.token_id("<｜Assistant｜>")
    assert tok.token_id("<think>") in ids and tok.token_id("</think>") in ids
    assert tok.decode(ids) == text
    assert tok.encode("a") == [D.BYTE_BASE + ord("a")] and tok.encode("") == []
    assert tok.decode([0, D.BYTE_BASE + 0xFF, 1]) == D.BOS + "\ufffd" + D.EOS
    assert tok.decode(np.array(tok.encode("<|User|> plain"))) == "<|User|> plain"  # ASCII '|'
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def _tiny_hf_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[D.BOS, D.EOS, "<｜User｜>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world", "the quick brown fox", "hello there"] * 5, trainer)
    tk.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = D.load_tokenizer(path)
    assert isinstance(tok, D.HFTokenizer) and isinstance(D.load_tokenizer(None), D.ByteTokenizer)
    assert (tok.bos_id, tok.eos_id) == (tok.token_id(D.BOS), tok.token_id(D.EOS))
    assert 0 < tok.vocab_size <= 300
    ids = tok.encode("<｜User｜>hello world")
    assert ids[0] == tok.token_id("<｜User｜>") and tok.bos_id not in ids
    assert tok.decode(ids) == "<｜User｜>hello world"
    assert tok.decode(tok.encode("naïve 🙂")) == "naïve 🙂"
    with pytest.raises(KeyError):
        tok.token_id("<think>")
    (tmp_path / "a.txt").write_text("hello world " * 3)
    batch = next(D.PackedBatches(tmp_path / "a.txt", tok, 2, 16, seed=0))
    assert batch["tokens"].shape == (2, 16) and batch["tokens"][0, 0] == tok.bos_id
    assert tok.eos_id in batch["tokens"]


# ------------------------------------------------------------------------------------ documents
def test_txt_and_directory(tmp_path):
    (tmp_path / "one.txt").write_text("line 1\nline 2\n")
    assert list(D.iter_documents(tmp_path / "one.txt")) == ["line 1\nline 2\n"]
    root = tmp_path / "dir"
    (root / "b").mkdir(parents=True)
    for name, text in [("b/z.py", "z"), ("a.md", "a"), ("c.txt", "c"), ("b/skip.json", "{}")]:
        (root / name).write_text(text)
    assert list(D.iter_documents(root)) == ["a", "z", "c"]  # sorted paths: a.md, b/z.py, c.txt
    (tmp_path / "x.csv").write_text("text\n")
    with pytest.raises(ValueError, match="x.csv"):
        list(D.iter_documents(tmp_path / "x.csv"))


def test_jsonl(tmp_path):
    texts = ["short", "é" * 50, "a\nb", "x" * 300, "", "end"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    assert list(D.iter_documents(path)) == texts
    for chunk_bytes in (1, 7, 64, 1000):  # chunk boundaries anywhere inside lines
        chunks = D.list_chunks(path, jsonl_chunk_bytes=chunk_bytes)
        assert [d for c in chunks for d in D.read_chunk(c)] == texts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        list(D.iter_documents(bad))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"document {i} " * (i + 1) for i in range(7)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(7))}), path, row_group_size=2)
    assert len(D.list_chunks(path)) == 4 and list(D.iter_documents(path)) == texts
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="text"):
        list(D.iter_documents(tmp_path / "bad.parquet"))


def test_default_corpus_files():
    files = D.default_corpus_files()
    assert files == sorted(files) and len(files) > 50 and all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split(os.sep)}
    assert not parts & {"test", "tests", "idlelib", "site-packages"}
    capped = D.default_corpus_files(max_bytes=200_000)
    assert capped == files[:len(capped)] and len(capped) < len(files)
    assert sum(os.path.getsize(f) for f in capped[:-1]) < 200_000


# -------------------------------------------------------------------------------------- packing
def test_packing_invariants(tmp_path):
    lengths = [3, 40, 7, 100, 1, 25, 64, 12, 9, 150, 30, 5]  # some longer than a row
    root, docs = _letter_corpus(tmp_path, lengths)
    tok = D.ByteTokenizer()
    B, S = 4, 32
    batches = _take(D.PackedBatches(root, tok, B, S, seed=3, read_threads=2), 12)
    for b in batches:
        assert set(b) == {"tokens", "segment_ids", "positions"}
        assert all(v.shape == (B, S) and v.dtype == np.int32 for v in b.values())
        for toks, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
            starts = np.r_[True, np.diff(seg) == 1]
            expected_pos = np.arange(S) - np.maximum.accumulate(np.where(starts, np.arange(S), 0))
            assert np.array_equal(pos, expected_pos)  # restart exactly where segments change
            assert np.all(toks[starts][1:] == tok.bos_id)  # only the row's first piece may continue
            for s in np.unique(seg):
                piece = toks[seg == s]
                assert tok.bos_id not in piece[1:] and tok.eos_id not in piece[:-1]
                body = {int(t) for t in piece if t >= D.BYTE_BASE}
                assert len(body) <= 1  # one letter = one document per segment
    # the whole stream is the documents, each whole and once per epoch, in a shuffled order
    stream = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    bos_at = np.flatnonzero(stream == tok.bos_id)
    pieces = [stream[a:b] for a, b in zip(bos_at[:-1], bos_at[1:])]
    as_text = [tok.decode(p[1:-1]) for p in pieces]
    assert all(p[-1] == tok.eos_id for p in pieces) and set(as_text) <= set(docs)
    n = len(docs)
    assert bos_at[0] == 0 and len(pieces) >= 2 * n  # the stream starts with a document
    epoch1, epoch2 = as_text[:n], as_text[n:2 * n]
    assert sorted(epoch1) == sorted(docs) == sorted(epoch2) and epoch1 != epoch2
    assert epoch1 != docs  # shuffled


def test_deterministic_and_seeded(tmp_path):
    root, _ = _letter_corpus(tmp_path, [5 + 7 * i for i in range(20)])
    tok = D.ByteTokenizer()
    a = _take(D.PackedBatches(root, tok, 3, 24, seed=7), 6)
    b = _take(D.PackedBatches(root, tok, 3, 24, seed=7, read_threads=1, prefetch=1), 6)
    c = _take(D.PackedBatches(root, tok, 3, 24, seed=8), 6)
    assert _same(a, b) and not _same(a, c)


@pytest.mark.parametrize("source", ["dir", "jsonl"])
def test_resume(tmp_path, source):
    root, docs = _letter_corpus(tmp_path, [2, 90, 11, 4, 60, 33, 8, 130, 17, 1, 45, 26])
    if source == "jsonl":  # one file cut into many chunks, shuffled inside each chunk
        root = tmp_path / "docs.jsonl"
        root.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = D.ByteTokenizer()
    make = lambda: D.PackedBatches(root, tok, 2, 16, seed=5, jsonl_chunk_bytes=100)
    full = _take(make(), 30)
    for k in (0, 1, 3, 7, 16):
        it = make()
        assert _same(_take(it, k), full[:k])
        state = json.loads(json.dumps(it.get_state()))  # plain JSON
        fresh = make()
        fresh.set_state(state)
        assert _same(_take(fresh, 30 - k), full[k:]), f"resume after {k} batches"
    other = D.PackedBatches(root, tok, 2, 16, seed=6, jsonl_chunk_bytes=100)
    with pytest.raises(ValueError, match="does not match"):
        other.set_state(state)


def test_hosts_share_the_global_batch(tmp_path):
    root = tmp_path / "numbered.jsonl"  # every row's content is unique
    root.write_text("".join(json.dumps({"text": "".join(f"{i}.{j}," for j in range(3 * i + 1))}) + "\n"
                            for i in range(15)))
    tok = D.ByteTokenizer()
    single = _take(D.PackedBatches(root, tok, 4, 20, seed=1), 5)
    hosts = [_take(D.PackedBatches(root, tok, 2, 20, seed=1, process_index=p, process_count=2), 5)
             for p in range(2)]
    for k, whole in enumerate(single):
        for p in range(2):
            assert all(np.array_equal(hosts[p][k][key], whole[key][p::2]) for key in whole)
        rows0 = {r.tobytes() for r in hosts[0][k]["tokens"]}
        assert not rows0 & {r.tobytes() for r in hosts[1][k]["tokens"]}  # disjoint rows
    with pytest.raises(ValueError):
        D.PackedBatches(root, tok, 2, 20, process_index=2, process_count=2)


def test_align_pads_documents_to_block_multiples(tmp_path):
    from v4jax.data import ByteTokenizer, PackedBatches
    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text("x" * (7 + 11 * i))
    tok = ByteTokenizer()
    batch = next(PackedBatches(str(tmp_path), tok, batch_size=4, seq_len=64, seed=1, align=16))
    seg, pos, toks = batch["segment_ids"], batch["positions"], batch["tokens"]
    for r in range(4):
        starts = [0] + [t for t in range(1, 64) if seg[r, t] != seg[r, t - 1]]
        assert all(t % 16 == 0 for t in starts), starts
        assert all(pos[r, t] == 0 for t in starts)
    assert (toks == tok.eos_id).sum() > 6  # EOS padding present
    with pytest.raises(ValueError, match="multiple of align"):
        PackedBatches(str(tmp_path), tok, batch_size=1, seq_len=60, align=16)
