"""Model FLOPs of a training step by formula (multiply-add = 2): the count `bench/` gates MFU on and
`train.py --compile-only` prints beside the compiled program's own count.

  matmul    6 * N_mm * T, T = tokens per step. N_mm = the parameters a token multiplies with: every
            "matrix" parameter, the routed experts x top-k / n_experts, the LM head twice (main + MTP
            logits); the input embedding (a lookup) is not counted.
  attention 3 x the forward attention-core FLOPs of every layer (main + MTP), per sequence, with V4's
            cost model (spec §1): CSA = lightning indexer over the S/4 compressed keys + core over
            min(k, t/4) selected entries + the window; HCA = all t/m entries + window; SWA = window.
  MaxText   the same matmul count plus dense causal attention, 3 x 4 * S^2 / 2 * n_heads * head_dim
            per layer and sequence, for comparison.
"""
from __future__ import annotations

from flax import nnx

from .model import abstract


def attn_fwd_flops(kind: str, S: int, n_heads: int, head_dim: int, *, m=4, m_hca=128, topk=512, window=128,
                   idx_heads=64, idx_dim=128) -> float:
    """Forward attention-core FLOPs of one layer over a causal sequence of S tokens (perf_model.layer_prefill_flops)."""
    per_pair = 4 * n_heads * head_dim  # QK + PV on the shared K = V vector
    if kind == "dense":
        return per_pair * S * S / 2
    win = S * window - window * window / 2 if S > window else S * S / 2
    if kind == "swa":
        return per_pair * win
    if kind == "hca":
        return per_pair * (S * S / (2 * m_hca) + win)
    if kind == "csa":
        idx = 2 * idx_heads * idx_dim * S * S / (2 * m)
        comp = S * S / (2 * m) if S <= topk * m else topk * S - topk * topk * m / 2  # sum_t min(k, t/m)
        return idx + per_pair * (comp + win)
    raise ValueError(kind)


def matmul_params(cfg) -> int:
    """N_mm: parameters multiplied per token (see the module docstring)."""
    n = 0
    for _, var in nnx.to_flat_state(nnx.state(abstract(cfg), nnx.Param)):
        role, size = var.get_metadata().get("role"), int(var.size)
        if role == "matrix":
            n += size
        elif role == "expert":
            n += size * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif role == "head":
            n += size * (1 + cfg.n_mtp)
    return n


def step_flops(cfg, S: int, n_seq: int) -> dict:
    layers = list(range(cfg.num_hidden_layers + cfg.n_mtp))
    kw = dict(n_heads=cfg.num_attention_heads, head_dim=cfg.head_dim, topk=cfg.index_topk,
              window=cfg.sliding_window, idx_heads=cfg.index_n_heads, idx_dim=cfg.index_head_dim)
    v4 = dense = 0.0
    for i in layers:
        r = cfg.compress_ratios[i]
        kind = "swa" if r == 0 else ("csa" if r == 4 else "hca")
        v4 += attn_fwd_flops(kind, S, m=4, m_hca=max(r, 1), **kw)
        dense += attn_fwd_flops("dense", S, **kw)
    n_mm = matmul_params(cfg)
    mm = 6.0 * n_mm * S * n_seq
    return {"n_mm": n_mm, "matmul": mm, "attn_v4": 3 * v4 * n_seq, "attn_dense": 3 * dense * n_seq,
            "total": mm + 3 * v4 * n_seq, "maxtext_total": mm + 3 * dense * n_seq}


GPU_BF16_PEAK = {  # dense (no sparsity) bf16 tensor-core peaks by device kind (lower-case substring)
    "h100 pcie": 756e12, "h100": 989.4e12, "h200": 989.4e12, "gh200": 989.4e12, "a100": 312e12,
    "b200": 2250e12, "l40s": 362e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Nominal dense bf16 FLOP/s of one device of this kind (TPU: aot.CHIPS; GPU: GPU_BF16_PEAK);
    None for a CPU or an unknown chip (no MFU is reported then)."""
    from .aot import CHIPS

    if device_kind in CHIPS:
        return CHIPS[device_kind][2]
    low = device_kind.lower()
    return next((GPU_BF16_PEAK[k] for k in sorted(GPU_BF16_PEAK, key=len, reverse=True) if k in low), None)
