"""DeepSeek-V4 optimiser: Muon for matrices (per expert slice), AdamW for the rest, one LR schedule.

Groups are chosen by each parameter's `role` metadata (set where it is created, see `layers.param`),
never by name: "matrix" [out, in] and "expert" [E, out, in] -> Muon; "vector", "embed", "head" -> AdamW.
Parameters of the scanned layer stack carry leading "layers" axes ([R, out, in]): one matrix per row.

Muon, for every matrix W [n, m] (each expert slice of an [E, n, m] tensor on its own), step t:

    M_t = mu * M_{t-1} + G_t                       (momentum, kept in float32)
    U   = mu * M_t + G_t                           (Nesterov; U = M_t without it)
    X_0 = U / (||U||_F + eps), transposed when n > m so that X is wide
    X_k = a_k X + b_k (X X^T) X + c_k (X X^T)^2 X  for the 10 (a_k, b_k, c_k) in `ns_coeffs`
    O   = X_10 (transposed back) * sqrt(max(n, m)) * update_rms
    W  <- W - lr_t * (O + weight_decay * W)       (decoupled weight decay, scaled by lr)

The whole transformation (`make_optimizer`) is
    clip_by_global_norm(clip_norm)  ->  partition {"muon": Muon, "adam": AdamW}  [-> MultiSteps]
with `lr_schedule(cfg)` for both groups.

Calling convention: `params` / `grads` are the `nnx.State` of `nnx.Param` variables
(`nnx.state(model, nnx.Param)`, the gradient of a function of that State), passed to `tx.init` and
`tx.update(grads, opt_state, params)` as they are; `optax.apply_updates(params, updates)` then gives
the new State. The `nnx.as_pure` form of the same State (plain arrays, as `nnx.Optimizer` passes
it) also works, provided `init` and `update` see the same form. Only `make_optimizer` needs the
Variables (it reads the roles).

Why not `optax.contrib.muon`: its momentum is a bias-corrected EMA, (1-mu)-weighted, and its
Nesterov mix beta * m_hat + (1-beta) * g_hat weighs M against G differently from mu * M + G at every
finite step, so it cannot reproduce the math above exactly. The momentum here is `optax.trace`
(exactly M = mu M + G, U = mu M + G), followed by our own Newton-Schulz and RMS scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .stack import n_layer_axes

# DeepSeek-V4 hybrid Newton-Schulz schedule: 8 fast-converging quintic steps, then 2 steps of
# f(x) = 2x - 1.5x^3 + 0.5x^5 (f(1) = 1, f'(1) = 0), which pull the singular values onto 1.
NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
NS_EPS = 1e-7  # added to ||U||_F before normalising
NS_PRECISION = jax.lax.Precision.HIGHEST  # float32 matmuls in the iteration (no TF32 / bf16 passes)

MUON_ROLES = ("matrix", "expert")
ADAM_ROLES = ("vector", "embed", "head")
_NDIM = {"matrix": 2, "expert": 3}


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser hyper-parameters (DeepSeek-V4 defaults); `total_steps` counts optimiser updates."""
    peak_lr: float = 2.7e-4
    end_lr_frac: float = 0.1
    warmup_steps: int = 2000
    total_steps: int
    muon_momentum: float = 0.95
    nesterov: bool = True
    update_rms: float = 0.18
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-20
    adam_weight_decay: float = 0.1
    clip_norm: float | None = 1.0  # None or <= 0: no clipping
    grad_accum: int = 1
    ns_coeffs: tuple[tuple[float, float, float], ...] = NS_COEFFS

    def __post_init__(self):
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps}, {self.total_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not self.ns_coeffs or any(len(c) != 3 for c in self.ns_coeffs):
            raise ValueError(f"ns_coeffs must be a non-empty sequence of (a, b, c), got {self.ns_coeffs}")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """lr(t) = peak * t / warmup for t < warmup; then
    lr(t) = end + (peak - end) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2 up to t = total,
    with end = end_lr_frac * peak; constant `end` after `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.end_lr_frac * cfg.peak_lr)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def labels_from_roles(params):
    """The tree of "muon" / "adam" labels, one per Variable of `params` (a prefix of `params`).

    "matrix" (2-D) and "expert" (3-D) -> "muon"; "vector", "embed", "head" -> "adam".
    Raises ValueError naming the parameter's path when its role is missing or unknown, or when a
    Muon parameter has the wrong number of dimensions."""
    def label(path, var):
        where = _path_str(path) or "<root>"
        if not isinstance(var, nnx.Variable):
            raise ValueError(f"parameter {where!r} is not an nnx.Variable, so it has no 'role' metadata; "
                             "pass the nnx.State of the model's Params (nnx.state(model, nnx.Param))")
        role = var.get_metadata().get("role")
        if role in ADAM_ROLES:
            return "adam"
        if role not in MUON_ROLES:
            raise ValueError(f"parameter {where!r} has role {role!r}; expected one of {MUON_ROLES + ADAM_ROLES}")
        if var.ndim - n_layer_axes(var) != _NDIM[role]:
            raise ValueError(f"parameter {where!r} has role {role!r} but shape {var.shape}; "
                             f"expected {_NDIM[role]} dims (after {n_layer_axes(var)} stacked-layer axes)")
        return "muon"

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def newton_schulz(u: jax.Array, coeffs=NS_COEFFS, eps: float = NS_EPS) -> jax.Array:
    """Approximate orthogonalisation U -> ~ U_svd V_svd^T of one 2-D matrix, in float32.

    X = U / (||U||_F + eps), made wide (transposed if rows > cols) so X X^T is the small Gram
    matrix; then per (a, b, c): A = X X^T, X <- a X + (b A + c A A) X; transposed back."""
    x = u.astype(jnp.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (jnp.linalg.norm(x) + eps)
    mm = lambda p, q: jnp.matmul(p, q, precision=NS_PRECISION)

    def step(x, abc):  # a scan over the coefficient table keeps the compiled program small
        a, b, c = abc[0], abc[1], abc[2]
        gram = mm(x, x.T)
        return a * x + mm(b * gram + c * mm(gram, gram), x), None

    x, _ = jax.lax.scan(step, x, jnp.asarray(coeffs, jnp.float32))
    return x.T if tall else x


def orthogonalize(u: jax.Array, coeffs=NS_COEFFS, rms: float = 1.0) -> jax.Array:
    """`newton_schulz` of a 2-D [n, m] update, or of each [n, m] slice of a stack ([E, n, m] experts,
    [R, n, m] scanned layers, [R, E, n, m]) independently, scaled by sqrt(max(n, m)) * rms (float32).
    Stacked dims are never merged (a merged dim could not keep their sharding); a 3-D stack is
    vmapped, a 4-D one runs one row's experts at a time (`lax.map` over R: vmapping both would hold
    the iteration's temporaries for every layer's experts at once)."""
    if not 2 <= u.ndim <= 4:
        raise ValueError(f"Muon updates must be matrices or [E | R, n, m] / [R, E, n, m] stacks, got {u.shape}")
    ns = lambda m: newton_schulz(m, coeffs)  # noqa: E731
    if u.ndim == 2:
        x = ns(u)
    elif u.ndim == 3:
        x = jax.vmap(ns)(u)
    else:
        x = jax.lax.map(jax.vmap(ns), u)
    return x * (math.sqrt(max(u.shape[-2:])) * rms)


def scale_by_muon(cfg: OptimConfig) -> optax.GradientTransformation:
    """G -> O: float32 momentum M = mu M + G (`optax.trace`), U = mu M + G if Nesterov else M,
    O = orthogonalize(U) * sqrt(max(n, m)) * update_rms. No learning rate, no weight decay."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: orthogonalize(u, cfg.ns_coeffs, cfg.update_rms), updates), state

    return optax.chain(
        optax.trace(decay=cfg.muon_momentum, nesterov=cfg.nesterov, accumulator_dtype=jnp.float32),
        optax.GradientTransformation(lambda params: optax.EmptyState(), update))


def muon(cfg: OptimConfig, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Full Muon update: -lr_t * (O + weight_decay * W), O from `scale_by_muon`."""
    return optax.chain(scale_by_muon(cfg), optax.add_decayed_weights(cfg.weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def make_optimizer(params, cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) over all grads, then Muon / AdamW by role, both on `lr_schedule`.

    `params`: the nnx.State of nnx.Param variables (roles are read from it; see the module docstring).
    AdamW: optax.adamw(lr_t, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=adam_weight_decay).

    With grad_accum = k > 1 the result is wrapped in optax.MultiSteps: the train step calls
    `tx.update` once per micro-batch; k-1 of every k calls return zero updates (parameters
    unchanged) and the k-th applies the transformation above to the mean of the k gradients.
    The schedule, momentum and Adam counters advance once per k micro-batches, so `total_steps`
    and `warmup_steps` count optimiser updates, not micro-batches."""
    sched = lr_schedule(cfg)
    adam = optax.adamw(sched, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                       weight_decay=cfg.adam_weight_decay)
    tx = optax.multi_transform({"muon": muon(cfg, sched), "adam": adam}, labels_from_roles(params))
    if cfg.clip_norm is not None and cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return tx
