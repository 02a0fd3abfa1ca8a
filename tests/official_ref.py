"""A plain-NumPy (float64) reading of DeepSeek's official DeepSeek-V4 inference formulas
(`inference/model.py` of the release), for whole sequences from position 0 with the QAT simulations off
(the `expected.npz` convention). Written from the official code's math, sharing nothing with v4jax: it
reads the checkpoint tensors by their hub names (`t`: name -> float64 array, `tid2eid` integer).

  forward(t, cfg, ids [B, S]) -> (logits [B, S, V], final streams [B, S, n, d], {layer: indexer top-k})
  mtp(t, cfg, h [B, S, n, d], next_ids [B, S], k) -> MTP block k's logits [B, S, V]
  indexer(t, prefix, cfg, x, qr) -> (index scores [B, S, N] (-inf = not visible), top-k ids [B, S, k])
  attention(t, prefix, cfg, x, ratio) -> (out [B, S, d], top-k ids or None)

`tests/test_edge_configs.py` checks this reading against the oracle fixture before trusting it.
"""
from __future__ import annotations

import math

import numpy as np


def rms(x, w, eps):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def angles(cfg, compressed: bool, n: int):
    """precompute_freqs_cis: rotation angles [n, rd/2]; compressed layers use compress_rope_theta + YaRN."""
    rd = cfg.qk_rope_head_dim
    theta = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / theta ** (np.arange(0, rd, 2) / rd)
    orig = cfg.rope_original_max_position if compressed else 0
    if orig > 0:
        def corr(rot):
            return rd * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
        low, high = max(math.floor(corr(cfg.rope_beta_fast)), 0), min(math.ceil(corr(cfg.rope_beta_slow)), rd - 1)
        high = high + 0.001 if low == high else high
        smooth = 1 - np.clip((np.arange(rd // 2) - low) / (high - low), 0, 1)
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return np.arange(n)[:, None] * freqs[None, :]


def rope(x, ang, inverse=False):
    """apply_rotary_emb on x[..., -rd:]: pairs (2i, 2i+1) as complex numbers times exp(+-i ang)."""
    rd = 2 * ang.shape[-1]
    z = x[..., x.shape[-1] - rd:].reshape(x.shape[:-1] + (rd // 2, 2))
    c = (z[..., 0] + 1j * z[..., 1]) * np.exp((-1j if inverse else 1j) * ang)
    rot = np.stack([c.real, c.imag], axis=-1).reshape(x.shape[:-1] + (rd,))
    return np.concatenate([x[..., :x.shape[-1] - rd], rot], axis=-1)


def hadamard(x):
    """rotate_activation: fast_hadamard_transform(x, scale=n^-1/2), i.e. x zero-padded to the next power of
    two P, times the Sylvester matrix H_P, the first n outputs."""
    n = x.shape[-1]
    p = 1 << (n - 1).bit_length()
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    xp = np.concatenate([x, np.zeros(x.shape[:-1] + (p - n,))], axis=-1)
    return (xp @ h)[..., :n] * n ** -0.5


def compress(t, p, cfg, x, ratio, width, ang, rotate):
    """Compressor.forward at start_pos 0 -> entries [B, S // ratio, width] (normed, roped, rotated)."""
    b, s, _ = x.shape
    n = s // ratio
    kv = (x @ t[p + "wkv.weight"].T)[:, :n * ratio].reshape(b, n, ratio, -1)
    sc = (x @ t[p + "wgate.weight"].T)[:, :n * ratio].reshape(b, n, ratio, -1) + t[p + "ape"]
    if ratio == 4:  # overlap: the previous block's first channel half ++ this block's second half
        c = width
        prev_kv = np.concatenate([np.zeros_like(kv[:, :1, :, :c]), kv[:, :-1, :, :c]], axis=1)
        prev_sc = np.concatenate([np.full_like(sc[:, :1, :, :c], -np.inf), sc[:, :-1, :, :c]], axis=1)
        kv = np.concatenate([prev_kv, kv[..., c:]], axis=2)
        sc = np.concatenate([prev_sc, sc[..., c:]], axis=2)
    e = np.sum(kv * softmax(sc, axis=2), axis=2)
    e = rope(rms(e, t[p + "norm.weight"], cfg.rms_norm_eps), ang[0:n * ratio:ratio])
    return hadamard(e) if rotate else e


def indexer(t, p, cfg, x, qr):
    """Indexer.forward at start_pos 0 -> (scores [B, S, N], top-k ids [B, S, min(k, N)], -1 = none)."""
    b, s, _ = x.shape
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    ang = angles(cfg, True, s)
    q = (qr @ t[p + "wq_b.weight"].T).reshape(b, s, hi, di)
    q = hadamard(rope(q, ang[:, None]))
    k = compress(t, p + "compressor.", cfg, x, 4, di, ang, rotate=True)
    w = (x @ t[p + "weights_proj.weight"].T) * (di ** -0.5 * hi ** -0.5)
    score = np.sum(np.maximum(np.einsum("bshd,bnd->bshn", q, k), 0) * w[..., None], axis=2)
    limit = (np.arange(1, s + 1) // 4)[:, None]  # entry j is visible to query i iff j < (i + 1) // 4
    score = np.where(np.arange(k.shape[1])[None, :] < limit, score, -np.inf)
    idx = np.argsort(-score, axis=-1, kind="stable")[..., :min(cfg.index_topk, k.shape[1])]
    return score, np.where(idx >= limit, -1, idx)


def attention(t, p, cfg, x, ratio):
    """Attention.forward at start_pos 0: window + compressed entries, one softmax with the sink."""
    b, s, _ = x.shape
    h, c, eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
    ang = angles(cfg, ratio > 0, s)
    qr = rms(x @ t[p + "wq_a.weight"].T, t[p + "q_norm.weight"], eps)
    q = rope(rms((qr @ t[p + "wq_b.weight"].T).reshape(b, s, h, c), None, eps), ang[:, None])
    kv = rope(rms(x @ t[p + "wkv.weight"].T, t[p + "kv_norm.weight"], eps), ang)
    pos = np.arange(s)
    ok = np.broadcast_to((pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - cfg.sliding_window), (b, s, s))
    keys, idx = kv, None
    if ratio:
        comp = compress(t, p + "compressor.", cfg, x, ratio, c, ang, rotate=False)
        vis = np.broadcast_to(np.arange(comp.shape[1])[None] < ((pos + 1) // ratio)[:, None], (b, s, comp.shape[1]))
        if ratio == 4:  # only the indexer's choices
            _, idx = indexer(t, p + "indexer.", cfg, x, qr)
            vis = np.zeros_like(vis)
            bb, ss, kk = np.nonzero(idx >= 0)
            vis[bb, ss, idx[bb, ss, kk]] = True
        keys, ok = np.concatenate([kv, comp], axis=1), np.concatenate([ok, vis], axis=-1)
    lg = np.where(ok[:, :, None], np.einsum("bshc,bkc->bshk", q, keys) * c ** -0.5, -np.inf)
    sink = t[p + "attn_sink"][None, None, :, None]
    m = np.maximum(np.max(lg, axis=-1, keepdims=True), sink)
    e = np.exp(lg - m)
    o = np.einsum("bshk,bkc->bshc", e / (np.sum(e, axis=-1, keepdims=True) + np.exp(sink - m)), keys)
    o = rope(o, ang[:, None], inverse=True).reshape(b, s, cfg.o_groups, -1)
    wo_a = t[p + "wo_a.weight"].reshape(cfg.o_groups, cfg.o_lora_rank, -1)
    z = np.einsum("bsgd,grd->bsgr", o, wo_a).reshape(b, s, -1)
    return z @ t[p + "wo_b.weight"].T, idx


def expert(t, p, x, limit):
    gate, up = x @ t[p + "w1.weight"].T, x @ t[p + "w3.weight"].T
    if limit > 0:
        up, gate = np.clip(up, -limit, limit), np.minimum(gate, limit)
    return (gate * sigmoid(gate) * up) @ t[p + "w2.weight"].T


def moe(t, p, cfg, x, ids, hashed: bool):
    """MoE.forward: Gate (score func, selection bias or tid2eid, renormalised x route scale) + shared expert."""
    xf = x.reshape(-1, x.shape[-1])
    logits = xf @ t[p + "gate.weight"].T
    score = {"softmax": lambda z: softmax(z, -1), "sigmoid": sigmoid}.get(
        cfg.scoring_func, lambda z: np.sqrt(np.logaddexp(0, z)))(logits)
    if hashed:
        idx = t[p + "gate.tid2eid"][ids.reshape(-1)]
    else:
        idx = np.argsort(-(score + t[p + "gate.bias"]), axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(score, idx, axis=-1)
    if cfg.scoring_func != "softmax":
        w = w / np.sum(w, axis=-1, keepdims=True)
    w = w * cfg.routed_scaling_factor
    outs = np.stack([expert(t, f"{p}experts.{e}.", xf, cfg.swiglu_limit) for e in range(cfg.n_routed_experts)])
    y = np.sum(w[..., None] * outs[idx, np.arange(xf.shape[0])[:, None]], axis=1)
    return (y + expert(t, p + "shared_experts.", xf, cfg.swiglu_limit)).reshape(x.shape)


def hc_pre(t, p, cfg, x):
    """Block.hc_pre with hc_split_sinkhorn -> (y [B, S, d], post [B, S, n], comb [B, S, n, n])."""
    b, s, n, d = x.shape
    xf = x.reshape(b, s, n * d)
    mix = (xf @ t[p + "_fn"].T) / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    scale, base, eps = t[p + "_scale"], t[p + "_base"], cfg.hc_eps
    pre = sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = softmax((mix[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(b, s, n, n), -1) + eps
    comb = comb / (np.sum(comb, axis=-2, keepdims=True) + eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        comb = comb / (np.sum(comb, axis=-1, keepdims=True) + eps)
        comb = comb / (np.sum(comb, axis=-2, keepdims=True) + eps)
    return np.sum(pre[..., None] * x, axis=2), post, comb


def block(t, p, cfg, layer, x, ids):
    """Block.forward -> (streams, indexer top-k or None); hc_post: X'_k = post_k F + sum_j comb[j, k] X_j."""
    eps = cfg.rms_norm_eps
    y, post, comb = hc_pre(t, p + "hc_attn", cfg, x)
    a, idx = attention(t, p + "attn.", cfg, rms(y, t[p + "attn_norm.weight"], eps), cfg.compress_ratios[layer])
    x = post[..., None] * a[:, :, None] + np.einsum("bsjk,bsjd->bskd", comb, x)
    y, post, comb = hc_pre(t, p + "hc_ffn", cfg, x)
    f = moe(t, p + "ffn.", cfg, rms(y, t[p + "ffn_norm.weight"], eps), ids, layer < cfg.num_hash_layers)
    return post[..., None] * f[:, :, None] + np.einsum("bsjk,bsjd->bskd", comb, x), idx


def head(t, p, cfg, x):
    """ParallelHead: hc_head (sigmoid weights, no Sinkhorn) -> norm -> the shared head, every position."""
    b, s, n, d = x.shape
    xf = x.reshape(b, s, n * d)
    mix = (xf @ t[p + "hc_head_fn"].T) / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    pre = sigmoid(mix * t[p + "hc_head_scale"] + t[p + "hc_head_base"]) + cfg.hc_eps
    y = rms(np.sum(pre[..., None] * x, axis=2), t[p + "norm.weight"], cfg.rms_norm_eps)
    return y @ t["head.weight"].T


def forward(t, cfg, ids):
    x = np.repeat(t["embed.weight"][ids][:, :, None], cfg.hc_mult, axis=2)
    topk = {}
    for i in range(cfg.num_hidden_layers):
        x, topk[i] = block(t, f"layers.{i}.", cfg, i, x, ids)
    return head(t, "", cfg, x), x, topk


def mtp(t, cfg, h, next_ids, k=0):
    p, eps = f"mtp.{k}.", cfg.rms_norm_eps
    e = rms(t["embed.weight"][next_ids], t[p + "enorm.weight"], eps) @ t[p + "e_proj.weight"].T
    x = e[:, :, None] + rms(h, t[p + "hnorm.weight"], eps) @ t[p + "h_proj.weight"].T
    x, _ = block(t, p, cfg, cfg.num_hidden_layers + k, x, next_ids)
    return head(t, p, cfg, x)
