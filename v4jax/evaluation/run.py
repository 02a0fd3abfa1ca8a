"""Running the evaluation tasks on a model: NIAH replies through serving.generate (greedy, the rows
of one batch of similar lengths decoded together) and the indexer diagnosis through the scorer."""
from __future__ import annotations

import numpy as np

from ..sampling import SamplingConfig
from ..serving import generate
from . import likelihood, niah


def _groups(samples, batch: int):
    """Indices of samples, longest first, `batch` at a time."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].ids))
    return [order[g: g + batch] for g in range(0, len(order), batch)]


def niah_replies(engine, tokenizer, samples, on_done=None) -> list[str]:
    """Greedy replies (stopping at a newline) to every sample's prompt."""
    out = [None] * len(samples)
    bos = [engine.cfg.bos_token_id]
    for idx in _groups(samples, engine.batch):
        need = max(samples[i].max_new_tokens for i in idx)
        sp = SamplingConfig(temperature=0.0, max_new_tokens=need, stop_strings=("\n",))
        prompts = [samples[i].ids for i in idx] + [bos] * (engine.batch - len(idx))
        engine.reset()
        res = generate(engine, prompts, sp, tokenizer)
        for i, g in zip(idx, res["outputs"]):
            out[i] = g.text
        if on_done:
            on_done(len(idx))
    return out


def csa_layers(cfg) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.compress_ratios[i] == 4]


def indexer_recalls(engine, samples, on_done=None) -> list[dict]:
    """Per sample {CSA layer: recall of the asked values' entries in the top-k of the question's last
    token} (niah.needle_recall), from one scoring pass over prompt + answer."""
    layers = csa_layers(engine.cfg)
    if not layers:
        raise ValueError("--diagnose-indexer: this model has no CSA layer (compress_ratios has no 4)")
    out = [None] * len(samples)
    for idx in _groups(samples, engine.batch):
        seqs = [np.asarray(samples[i].ids + [0]) for i in idx]  # one extra target: the question's last
        res = likelihood.score_rows(engine, seqs, pick_at=[len(samples[i].ids) - 1 for i in idx])  # token predicts
        for i, r in zip(idx, res):
            out[i] = niah.needle_recall(samples[i], r["picks"], layers)
        if on_done:
            on_done(len(idx))
    return out
