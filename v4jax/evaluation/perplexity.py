"""Perplexity and bits per byte over documents of any length, with the loss by position bucket.

Each document is BOS + its tokens. A document longer than the engine's context is cut into windows
of max_context inputs (likelihood.windows: each window from an empty state, every token predicted
once); the position of a prediction is its input's index inside its window, so the bucket table
shows how the loss falls as more context is available:

  "0-1K": mean NLL of predictions made with 0..1023 tokens before them in the window, "1K-4K", ...

bits per byte = total NLL / ln 2 / the documents' UTF-8 bytes (BOS predicts nothing: no bytes).
"""
from __future__ import annotations

import math

import numpy as np

from . import likelihood

BUCKET_EDGES = (0, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)


def bucket_name(lo: int, hi: int) -> str:
    def k(n):
        return "0" if n == 0 else (f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K")
    return f"{k(lo)}-{k(hi)}"


def doc_tokens(tokenizer, text: str, bos_id: int) -> np.ndarray:
    ids = list(tokenizer.encode(text))
    if not ids or ids[0] != bos_id:
        ids = [bos_id] + ids
    return np.asarray(ids, np.int64)


def evaluate(engine, tokenizer, documents, progress=None, max_tokens: int | None = None) -> dict:
    """documents: an iterable of texts -> {"documents", "tokens" (predictions), "bytes", "nll" (mean,
    nats), "perplexity", "bits_per_byte", "buckets": [{"positions", "tokens", "nll", "perplexity"}]}.
    max_tokens: stop taking documents once this many predictions are collected (the last one taken
    whole). progress(total tokens) -> a callback taking the tokens scored after each chunk."""
    seqs, n_bytes, n_docs, taken = [], 0, 0, 0
    for text in documents:
        if max_tokens is not None and taken >= max_tokens:
            break
        toks = doc_tokens(tokenizer, text, engine.cfg.bos_token_id)
        if toks.size < 2:
            continue  # an empty document predicts nothing
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        seqs += [w for _, w in likelihood.windows(toks, engine.max_context)]
        taken += toks.size - 1
    if not seqs:
        raise ValueError("no document with any text to score")
    on_tokens = progress(sum(s.size - 1 for s in seqs)) if progress else None
    results = likelihood.score_many(engine, seqs, on_tokens=on_tokens)
    nll = np.concatenate([-r["logp"] for r in results])
    pos = np.concatenate([np.arange(r["logp"].size) for r in results])
    buckets = []
    for lo, hi in zip(BUCKET_EDGES[:-1], BUCKET_EDGES[1:]):
        sel = (pos >= lo) & (pos < hi)
        if lo >= engine.max_context or not sel.any():
            continue
        m = float(nll[sel].mean())
        buckets.append({"positions": bucket_name(lo, hi), "tokens": int(sel.sum()), "nll": m,
                        "perplexity": math.exp(min(m, 700.0))})
    total = float(nll.sum())
    mean = total / nll.size
    return {"documents": n_docs, "tokens": int(nll.size), "bytes": n_bytes, "windows": len(seqs), "nll": mean,
            "perplexity": math.exp(min(mean, 700.0)), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "buckets": buckets}


def table(res: dict) -> str:
    lines = [f"{res['documents']} documents, {res['tokens']} tokens, {res['bytes']} bytes: perplexity "
             f"{res['perplexity']:.4g}, {res['bits_per_byte']:.4f} bits/byte, NLL {res['nll']:.4f}",
             f"{'positions':>12} {'tokens':>10} {'NLL':>8} {'ppl':>10}"]
    for b in res["buckets"]:
        lines.append(f"{b['positions']:>12} {b['tokens']:>10} {b['nll']:>8.4f} {b['perplexity']:>10.4g}")
    return "\n".join(lines)
