"""The decode engine: a preallocated, donated decode state for `batch` sequences of up to
`max_context` tokens, chunked prefill continuing any state, one-token decode with in-jit sampling,
MTP speculative decoding, and cheap snapshots for forks (quick instructions, multi-turn edits).

State (spec §11.1, per layer; see Attention.empty_state / kvstore):
  win            [B, W, c]        the last W KV rows, oldest first (plain, or FP8 + bf16 RoPE dims)
  comp.tail_a/z  [B, k*m, k*c]    fp32 unfinished compressor block(s)              (CSA, HCA)
  comp.kv        [B, N/m, c]      compressed entries, append-only                  (CSA, HCA)
  index.*        the indexer's compressor tails and keys [B, N/4, dI] (FP4 layout)  (CSA)

Cost proportional to the real context: a step at positions < P reads only the first
entries_for(bucket) rows of every entry buffer (`context_limit`), bucket = the next power of two
>= P (at least `min_bucket`); new entries are scattered in place into the donated buffers. One
compiled step per (chunk length, bucket): log2(max_context) of them at most.

Append-only entries make forks cheap: a snapshot copies only the window and the compressor tails
(plus the position). Restoring one leaves the entry buffers alone: rows written after the snapshot
lie at or beyond the restored entry count, are invisible to its causal masks, and are overwritten
before they can be read again.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .checkpoint import relayout
from .sampling import SamplingConfig, sample
from .scoring import check_tokens
from .sharding import batch_sharding


def entries_for(context: int, ratio: int) -> int:
    return max(1, context // ratio) if ratio else 0


def _map_layers(state, ratios, fn):
    """Apply fn(layer_state, ratio) to every main and MTP layer state."""
    n = len(state["layers"])
    return {"layers": [fn(s, r) for s, r in zip(state["layers"], ratios[:n])],
            "mtp": [fn(s, r) for s, r in zip(state["mtp"], ratios[n:])]}


def _row_view(state, ratios, p: int, take):
    """take(leaf, n) for every leaf of a batched state, n = the entry rows a context of p tokens filled
    (entry buffers) or None (windows, tails): the layout of one row as export_row saves it."""
    def each(tree, n):
        return jax.tree.map(lambda x: take(x, n), tree)

    def layer(st, r):
        out = {}
        for k, v in st.items():
            if k in ("comp", "index"):
                n = entries_for(p, r) if p >= r else 0
                out[k] = {kk: each(vv, n if kk == "kv" else None) for kk, vv in v.items()}
            else:
                out[k] = each(v, None)
        return out

    return _map_layers(state, ratios, layer)


def small_part(state, ratios):
    """Everything but the entry buffers (windows and compressor tails)."""
    def layer(st, r):
        return {k: ({kk: vv for kk, vv in v.items() if kk != "kv"} if k in ("comp", "index") else v)
                for k, v in st.items()}

    return _map_layers(state, ratios, layer)


def with_small(state, small, ratios):
    """`state` with its windows and tails replaced by `small`."""
    flat = {"layers": small["layers"], "mtp": small["mtp"]}

    def merge(st, sm):
        out = dict(st)
        for k, v in sm.items():
            out[k] = {**st[k], **v} if k in ("comp", "index") else v
        return out

    return {"layers": [merge(s, m) for s, m in zip(state["layers"], flat["layers"])],
            "mtp": [merge(s, m) for s, m in zip(state["mtp"], flat["mtp"])]}


# ------------------------------------------------------------------------------ jitted steps
# Every step takes the parameters as a flat list of arrays (`ptree` rebuilds the nnx.State inside the
# trace): flattening an nnx.State on every call costs more host time than a tiny model's whole step.
def _model(graphdef, ptree, leaves):
    return nnx.merge(graphdef, jax.tree.unflatten(ptree, leaves))


def _mtp_advance(model, h_btnd, ids_bt, start_b, state, valid_b, bucket):
    """Feed pairs (h_t, x_{t+1}) to the MTP block's state without computing its logits."""
    blk = model.mtp[0]
    x = blk.inputs(h_btnd, model.embed(ids_bt))
    _, state, _ = blk(x, ids_bt, start_b, state, None, None, None, valid_b, bucket)
    return state


@functools.lru_cache(maxsize=64)
def _prefill_fn(graphdef, ptree, ratios, bucket: int, with_mtp: bool, all_logits: bool = False):
    """(params, ids [B,T], start [B], valid [B], state, pend_h [B,n,d]) ->
    (logits at each row's last valid token [B,V] (all_logits: [B,T,V]), streams there [B,n,d], state).

    With MTP on, the MTP block consumes the pairs (h_t, x_{t+1}) this chunk completes: (pend_h, x_0),
    (h_0, x_1), ... at positions start-1 .. start+T-2 (a row starting at 0 has no first pair)."""
    def run(params, ids, start, valid, state, pend_h):
        model = _model(graphdef, ptree, params)
        last = jnp.maximum(valid - 1, 0)
        out = model(ids, start, {"layers": state["layers"], "mtp": None}, valid_b=valid,
                    logits_at=None if all_logits else last, context_limit=bucket)
        h = out["streams"]  # [B, T, n, d]
        new = {"layers": out["state"]["layers"], "mtp": state["mtp"]}
        if with_mtp:
            first = (start == 0)[:, None]
            h_in = jnp.where(first[..., None, None], h, jnp.concatenate([pend_h[:, None], h[:, :-1]], axis=1))
            ids_in = jnp.where(first, jnp.roll(ids, -1, axis=1), ids)
            m_start = jnp.maximum(start - 1, 0)
            m_valid = jnp.maximum(jnp.where(start == 0, valid - 1, valid), 0)
            new["mtp"] = [_mtp_advance(model, h_in, ids_in, m_start, state["mtp"][0], m_valid, bucket)] + state["mtp"][1:]
        h_last = jnp.take_along_axis(h, last[:, None, None, None], axis=1)[:, 0]
        pend = jnp.where((valid > 0)[:, None, None], h_last, pend_h)
        return out["logits"] if all_logits else out["logits"][:, 0], pend, new

    return jax.jit(run, donate_argnums=(4, 5))


@functools.lru_cache(maxsize=64)
def _decode_fn(graphdef, ptree, ratios, bucket: int):
    """(params, ctl [3, B] = (token, position, active), state, pend_h [B,n,d], key, knobs) ->
    (next [B], logits [B,V], pend_h (the new streams on active rows), state)."""
    def run(params, ctl, state, pend_h, key, temperature, top_k, top_p, vocab_limit):
        model = _model(graphdef, ptree, params)
        tok, pos, valid = ctl[0], ctl[1], ctl[2]
        out = model(tok[:, None], pos, {"layers": state["layers"], "mtp": None}, valid_b=valid, context_limit=bucket)
        logits = out["logits"][:, 0]
        nxt = sample(logits, key, temperature, top_k, top_p, vocab_limit)
        pend = jnp.where((valid > 0)[:, None, None], out["streams"][:, 0], pend_h)
        return nxt, logits, pend, {"layers": out["state"]["layers"], "mtp": state["mtp"]}

    return jax.jit(run, donate_argnums=(2, 3))


def _argmax(logits, vocab_limit):
    ids = jnp.arange(logits.shape[-1])
    ok = (vocab_limit <= 0) | (ids < vocab_limit)
    return jnp.argmax(jnp.where(ok, logits, -jnp.inf), axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _draft_fn(graphdef, ptree, ratios, bucket: int):
    """MTP on one pair (h_{p}, x_{p+1}) at position p -> (draft for p+2 [B], state)."""
    def run(params, h, nxt, p, state, vocab_limit):
        model = _model(graphdef, ptree, params)
        logits, st, _ = model.mtp_logits(h[:, None], nxt[:, None], p, state["mtp"][0], context_limit=bucket)
        return _argmax(logits[:, 0], vocab_limit), {"layers": state["layers"], "mtp": [st] + state["mtp"][1:]}

    return jax.jit(run, donate_argnums=(4,))


@functools.lru_cache(maxsize=64)
def _spec_fn(graphdef, ptree, ratios, bucket: int):
    """Greedy MTP speculation, one step: verify the draft d with the main model on [tok, d].

    (params, tok [B], d [B], pos [B], state) -> (g1 [B], g2 [B], accepted [B] bool, new draft [B], state).
    Accepted rows commit (d, g2) and advance 2; rejected rows commit g1 and advance 1: their main
    state is recomputed from the input windows/tails with only `tok` valid (entries written for the
    rejected draft lie beyond the committed count: harmless, see the module docstring)."""
    def run(params, tok, d, pos, state, vocab_limit):
        model = _model(graphdef, ptree, params)
        main_in = {"layers": state["layers"], "mtp": None}
        ids = jnp.stack([tok, d], axis=1)
        out = model(ids, pos, main_in, context_limit=bucket)
        g = _argmax(out["logits"], vocab_limit)  # [B, 2]
        acc = g[:, 0] == d
        h = out["streams"]  # [B, 2, n, d]

        def redo(_):
            fixed = with_small({"layers": out["state"]["layers"], "mtp": state["mtp"]}, small_part(state, ratios), ratios)
            return model(ids, pos, {"layers": fixed["layers"], "mtp": None}, valid_b=1 + acc.astype(jnp.int32),
                         context_limit=bucket)["state"]["layers"]

        layers = jax.lax.cond(jnp.all(acc), lambda _: out["state"]["layers"], redo, None)
        m_valid = 1 + acc.astype(jnp.int32)
        m_logits, mtp_st, _ = model.mtp_logits(h, g, pos, state["mtp"][0], valid_b=m_valid, context_limit=bucket)
        draft = _argmax(jnp.take_along_axis(m_logits, (m_valid - 1)[:, None, None], axis=1)[:, 0], vocab_limit)
        return g[:, 0], g[:, 1], acc, draft.astype(jnp.int32), {"layers": layers, "mtp": [mtp_st] + state["mtp"][1:]}

    return jax.jit(run, donate_argnums=(4,))


def _params_mesh(params):
    for leaf in jax.tree.leaves(params):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            return sh.mesh
    return None


def _under_mesh(fn, mesh):
    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)
    return call


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# ------------------------------------------------------------------------------ fingerprint
# Run-time config keys left out of the fingerprint: they choose how the same function is computed
# (blocking, MoE dispatch, kernels, layer layout, rematerialisation) or matter to training only, so a
# state saved under one value is valid under another (up to float rounding).
FINGERPRINT_NEUTRAL = ("attn_block", "moe_impl", "moe_kernel", "attention_kernel", "scan_layers", "remat",
                       "indexer_loss")
FINGERPRINT_SAMPLES = 256  # elements sampled per parameter array


def _sample_positions(size: int) -> np.ndarray:
    """FINGERPRINT_SAMPLES flat positions in [0, size), evenly spread (golden-ratio sequence); all if fewer."""
    if size <= FINGERPRINT_SAMPLES:
        return np.arange(size)
    return np.array([((k * 0x9E3779B97F4A7C15) & (2 ** 64 - 1)) * size >> 64 for k in range(FINGERPRINT_SAMPLES)])


@functools.lru_cache(maxsize=8)
def _sampler(shapes: tuple, mesh):
    """Jitted gather of every leaf's sample positions (point gathers: a sharded leaf is read where it
    lies); the samples come back replicated."""
    idx = [np.unravel_index(_sample_positions(math.prod(s)), s) if s else None for s in shapes]

    def run(leaves):
        return [x[i] if x.ndim else x[None] for x, i in zip(leaves, idx)]

    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=[NamedSharding(mesh, P())] * len(shapes))


def weights_digest(leaves, mesh=None) -> str:
    """sha256 (hex, 32 digits) over every parameter array's shape and dtype and the bytes of
    FINGERPRINT_SAMPLES of its elements at fixed positions spread over the whole array, gathered on the
    device: about 1 KB per array reaches the host and the cost does not grow with the model's size.
    Two checkpoints of the same shapes differ in practically every sample (another training run, a
    fine-tune, a requantisation); weights edited only away from every sampled element (a few rows) are
    not seen: give PrefixCache a `tag` (e.g. the checkpoint revision) for those."""
    shapes = tuple(tuple(x.shape) for x in leaves)
    h = hashlib.sha256()
    for x, picked in zip(leaves, _sampler(shapes, mesh)(list(leaves))):
        h.update(f"{x.dtype}{tuple(x.shape)};".encode())
        h.update(np.asarray(picked).tobytes())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------ engine
class Engine:
    """Decode state + jitted steps for one model.

        eng = Engine(model, max_context=4096, batch=2)
        logits = eng.prefill([[0, 5, 7], [0, 9]])        # rows of different lengths
        nxt, logits = eng.decode(nxt_tokens, SamplingConfig(), key)
    """

    def __init__(self, model, max_context: int, batch: int = 1, kv_layout: str | None = None,
                 min_bucket: int = 1024, speculative: bool = False, prefill_chunk: int = 2048,
                 fixed_chunk: bool = False):
        cfg = model.cfg
        if max_context < 1 or max_context > cfg.max_position_embeddings:
            raise ValueError(f"max_context must be within 1..{cfg.max_position_embeddings} "
                             f"(max_position_embeddings), got {max_context}")
        if speculative and not cfg.n_mtp:
            raise ValueError("speculative decoding needs an MTP block (num_nextn_predict_layers >= 1)")
        if any(seg.reps > 1 for seg in model.plan):  # decode runs layer by layer: one array per layer
            model = relayout(model, scan_layers=False)
            cfg = model.cfg
        self.cfg, self.model = cfg, model
        self.graphdef, self.params = nnx.split(model)
        self.param_leaves, self._ptree = jax.tree.flatten(self.params)
        self._fns, self._knobs = {}, {}  # jitted steps and sampling knobs, looked up without hashing the graphdef
        self.max_context, self.batch, self.kv_layout = max_context, batch, kv_layout
        self.min_bucket, self.speculative = min_bucket, speculative
        self.prefill_chunk, self.fixed_chunk = prefill_chunk, fixed_chunk  # fixed: every call pads to the chunk
        self.ratios = tuple(cfg.compress_ratios[: cfg.num_hidden_layers + cfg.n_mtp])
        self.mesh = _params_mesh(self.params)
        self.state = self._placed(lambda: model.init_state(batch, max_context, kv_layout))
        self.pos = np.zeros(batch, np.int64)
        self.pend_h = self._placed(lambda: jnp.zeros((batch, cfg.hc_mult, cfg.dim), jnp.dtype(cfg.dtype)))
        self._fingerprint = None

    # ---------------------------------------------------------------- helpers
    def step_fn(self, make, *static):
        """The jitted step `make(graphdef, ptree, ratios, *static)` (shared between engines of one model
        through make's lru_cache; cached here so a call does not hash the graphdef)."""
        k = (make, *static)
        if k not in self._fns:
            fn = make(self.graphdef, self._ptree, self.ratios, *static)
            if self.mesh is not None:  # traced under the parameters' mesh: the MoE picks its per-shard paths
                fn = _under_mesh(fn, self.mesh)
            self._fns[k] = fn
        return self._fns[k]

    def knobs(self, sampling: SamplingConfig):
        if sampling not in self._knobs:
            self._knobs[sampling] = sampling.knobs()
        return self._knobs[sampling]

    def _placed(self, make):
        """Build a batch-first tree directly with its shardings on the parameters' mesh (batch over
        data/fsdp), so every step sees the same input shardings (no retracing)."""
        shapes = jax.eval_shape(make)
        if self.mesh is None:
            return jax.jit(make)()
        out = jax.tree.map(lambda s: batch_sharding(self.mesh, s.shape), shapes)
        return jax.jit(make, out_shardings=out)()

    def bucket(self, end: int) -> int:
        b = max(self.min_bucket, 1 << max(0, int(end) - 1).bit_length())
        return min(b, self.max_context)

    def chunk_len(self, n: int, chunk: int) -> int:
        """The compiled length of a chunk holding n new tokens: the chunk, or a shorter last one padded to
        a power of two (at least 16; the chunk itself when `fixed_chunk`), so few shapes are compiled."""
        return chunk if n == chunk or self.fixed_chunk else min(chunk, max(16, 1 << (n - 1).bit_length()))

    def _check_room(self, extra):
        over = self.pos + np.asarray(extra) > self.max_context
        if np.any(over):
            b = int(np.argmax(over))
            raise ValueError(f"sequence {b}: {int(self.pos[b])} tokens in the state + {int(np.asarray(extra)[b])} "
                             f"new ones exceed the maximum context of {self.max_context} tokens")

    def reset(self):
        """Empty every row (entry buffers are left as they are: invisible at position 0)."""
        empty = self._placed(lambda: small_part(self.model.init_state(self.batch, 1, self.kv_layout), self.ratios))
        self.state = with_small(self.state, empty, self.ratios)
        self.pos[:] = 0

    # ---------------------------------------------------------------- prefill
    def prefill(self, rows, chunk: int | None = None, all_logits: bool = False,
                progress: bool | None = None) -> np.ndarray:
        """Append token rows (a list of B sequences of any lengths, or [B, T]) -> logits [B, V] at each
        row's last new token (rows with no new tokens get zeros). Chunks of `chunk` tokens (default
        `prefill_chunk`); a shorter last chunk is padded to a power of two (or to the chunk when
        `fixed_chunk`), so few shapes are compiled. `all_logits`: [B, T, V] for every new token
        (rows of equal length only; the scoring path). `progress`: a tqdm bar of tokens on stderr
        (None: on a terminal, once the prefill has taken 2 s; True: always; False: never)."""
        chunk = chunk or self.prefill_chunk
        rows = [np.asarray(r, np.int64).reshape(-1) for r in rows]
        if len(rows) != self.batch:
            raise ValueError(f"prefill got {len(rows)} sequences for an engine of batch {self.batch}")
        for r in rows:
            if r.size:
                check_tokens(r[None], self.cfg.vocab_size)
        lens = np.array([r.size for r in rows])
        self._check_room(lens)
        if all_logits and len(set(lens.tolist())) > 1:
            raise ValueError("all_logits prefill needs rows of equal length")
        logits = np.zeros((self.batch, self.cfg.vocab_size), np.float32)
        every = []
        done = 0
        bar = tqdm.tqdm(total=int(lens.max(initial=0)), unit="tok", unit_scale=True, desc="prefill", leave=False,
                        delay=0 if progress else 2, disable=None if progress is None else not progress)
        while done < lens.max(initial=0):
            n = min(chunk, int(lens.max()) - done)
            t = self.chunk_len(n, chunk)
            ids = np.zeros((self.batch, t), np.int32)
            valid = np.clip(lens - done, 0, n)
            for b, r in enumerate(rows):
                ids[b, : valid[b]] = r[done: done + valid[b]]
            fn = self.step_fn(_prefill_fn, self.bucket(int((self.pos + valid).max())), self.speculative, all_logits)
            lg, self.pend_h, self.state = fn(self.param_leaves, jnp.asarray(ids), jnp.asarray(self.pos, jnp.int32),
                                             jnp.asarray(valid, jnp.int32), self.state, self.pend_h)
            lg = np.asarray(lg, np.float32)
            if all_logits:
                every.append(lg[:, :n])
            else:
                logits[valid > 0] = lg[valid > 0]
            self.pos += valid
            done += n
            bar.update(n)
        bar.close()
        return np.concatenate(every, axis=1) if all_logits else logits

    # ---------------------------------------------------------------- decode
    def decode(self, tokens, sampling: SamplingConfig, key, active=None):
        """Feed one token per row (rows with active=False are left untouched) ->
        (sampled next tokens [B] np, logits [B, V] jax)."""
        tokens = np.asarray(tokens, np.int64).reshape(self.batch)
        check_tokens(tokens[None], self.cfg.vocab_size)
        active = np.ones(self.batch, bool) if active is None else np.asarray(active, bool)
        self._check_room(active.astype(np.int64))
        fn = self.step_fn(_decode_fn, self.bucket(int((self.pos + active).max())))
        ctl = np.stack([tokens, self.pos, active]).astype(np.int32)  # one transfer (as a jit argument)
        nxt, logits, self.pend_h, self.state = fn(self.param_leaves, ctl, self.state, self.pend_h, key,
                                                  *self.knobs(sampling))
        self.pos += active
        return np.asarray(nxt), logits

    def draft(self, nxt, vocab_limit: int = 0) -> np.ndarray:
        """MTP draft of the token after `nxt` (the token just sampled after the last processed one)."""
        p = jnp.asarray(self.pos - 1, jnp.int32)
        fn = self.step_fn(_draft_fn, self.bucket(int(self.pos.max())))
        d, self.state = fn(self.param_leaves, self.pend_h, jnp.asarray(nxt, jnp.int32), p, self.state, jnp.int32(vocab_limit))
        return np.asarray(d)

    def speculate(self, tok, d, vocab_limit: int = 0):
        """One verify step -> (committed tokens per row: list of 1 or 2 ids, new draft [B])."""
        self._check_room(np.full(self.batch, 2))
        fn = self.step_fn(_spec_fn, self.bucket(int(self.pos.max()) + 2))
        g1, g2, acc, draft, self.state = fn(self.param_leaves, jnp.asarray(tok, jnp.int32), jnp.asarray(d, jnp.int32),
                                            jnp.asarray(self.pos, jnp.int32), self.state, jnp.int32(vocab_limit))
        g1, g2, acc = np.asarray(g1), np.asarray(g2), np.asarray(acc)
        self.pos += 1 + acc
        return [[int(g1[b]), int(g2[b])] if acc[b] else [int(g1[b])] for b in range(self.batch)], np.asarray(draft)

    # ---------------------------------------------------------------- forks
    def snapshot(self) -> dict:
        """Copies of the windows, compressor tails and positions (not the entry buffers)."""
        return {"small": _copy(small_part(self.state, self.ratios)), "pos": self.pos.copy(),
                "pend_h": jnp.array(self.pend_h, copy=True)}

    def restore(self, snap: dict) -> None:
        self.state = with_small(self.state, _copy(snap["small"]), self.ratios)
        self.pos = snap["pos"].copy()
        self.pend_h = jnp.array(snap["pend_h"], copy=True)

    # ---------------------------------------------------------------- prefix states on disk
    def fingerprint(self) -> str:
        """What a saved row state depends on, as one string (prefix caches key and check entries by it):
        the model config (hub keys and the run-time keys that change the numbers: compute and parameter
        dtypes, QAT simulations, CSA mode, MoE capacity, native weights; not FINGERPRINT_NEUTRAL), the
        weights (`weights_digest`), the KV layout, and whether prefill advances the MTP state
        (speculative engines do; other engines leave it empty). Computed once per engine."""
        if self._fingerprint is None:
            cfg = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in FINGERPRINT_NEUTRAL}
            cfg_h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
            self._fingerprint = (f"v4jax-row/1 config={cfg_h} weights={weights_digest(self.param_leaves, self.mesh)} "
                                 f"kv={self.kv_layout or 'compute'} mtp={'on' if self.speculative else 'off'}")
        return self._fingerprint

    def export_row(self, b: int = 0) -> dict:
        """Row b's state as host arrays, entry buffers cut to the rows its context filled."""
        p = int(self.pos[b])
        state = _row_view(self.state, self.ratios, p, lambda x, n: np.asarray(x[b] if n is None else x[b, :n]))
        return {"state": state, "pos": p, "pend_h": np.asarray(self.pend_h[b])}

    def _check_row(self, row: dict) -> tuple[int, list]:
        """(position, flat arrays) of `row`, after checking that the position is a token count within the
        maximum context, agrees with the row's tokens (if any) and that every array has exactly the
        shape and dtype export_row gives at that position on this engine (ValueError otherwise)."""
        p = row["pos"]
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)) or not 0 <= p <= self.max_context:
            raise ValueError(f"saved prefix position pos={p!r} is not a token count within 0..{self.max_context}")
        p = int(p)
        if row.get("tokens") is not None and len(row["tokens"]) != p:
            raise ValueError(f"saved prefix position pos={p} disagrees with its {len(row['tokens'])} tokens")

        def spec(x, n):
            return jax.ShapeDtypeStruct(x.shape[1:] if n is None else (n, *x.shape[2:]), x.dtype)

        want, tdef = jax.tree.flatten(_row_view(self.state, self.ratios, p, spec))
        if isinstance(row["state"], list):  # leaves only (load_prefix_state)
            got = row["state"]
        else:
            got, rdef = jax.tree.flatten(row["state"])
            if rdef != tdef:
                raise ValueError("saved prefix state is not laid out like this engine's: another model or KV layout")
        if len(got) != len(want):
            raise ValueError(f"saved prefix state has {len(got)} arrays, this engine's state {len(want)}: "
                             "another model or KV layout")
        for i, (w, r) in enumerate(zip(want, got)):
            if tuple(np.shape(r)) != w.shape or np.dtype(r.dtype) != w.dtype:
                raise ValueError(f"saved prefix array {i} is {np.dtype(r.dtype)}{tuple(np.shape(r))}, this engine "
                                 f"expects {w.dtype}{w.shape} at pos={p}: another model or KV layout, or a "
                                 "tampered position")
        if tuple(np.shape(row["pend_h"])) != self.pend_h.shape[1:]:
            raise ValueError(f"saved prefix streams of shape {np.shape(row['pend_h'])} do not fit this engine "
                             f"({self.pend_h.shape[1:]})")
        return p, got

    def import_row(self, row: dict, b: int = 0) -> None:
        """Inverse of export_row (entry rows written at the front of row b's buffers). A row that does not
        fit (see _check_row) is refused with a ValueError and the state is left as it was."""
        p, flat_row = self._check_row(row)
        flat_full, tdef = jax.tree.flatten(self.state)
        new = [f.at[b, : r.shape[0]].set(jnp.asarray(r)) if r.shape != f.shape[1:] else f.at[b].set(jnp.asarray(r))
               for f, r in zip(flat_full, flat_row)]
        self.state = tdef.unflatten(new)
        self.pos[b] = p
        self.pend_h = self.pend_h.at[b].set(jnp.asarray(row["pend_h"], self.pend_h.dtype))


# ------------------------------------------------------------------------------ ahead-of-time plan
def compile_plan(cfg, devices, mesh, max_context: int, kv_layout: str | None = None, batch: int = 1,
                 chunk: int = 2048) -> dict:
    """The engine's prefill-chunk and decode steps compiled for `mesh` (abstract TPU devices from
    `aot.tpu_devices`, or real ones) with abstract parameters and a decode state for `batch` x
    `max_context` tokens (nothing allocated) -> {"prefill": report, "decode": report} (`aot`).

    Shardings are the engine's: parameters by the rules table (as `checkpoint.load_hub` places
    them), the decode state and per-row inputs batch-first over the batch axes (data, fsdp, expert).
    Both steps are compiled at the largest bucket (a step at full context reads every entry row)."""
    from . import aot
    from .model import abstract
    from .sharding import state_shardings

    model = abstract(cfg.with_runtime(scan_layers=False))  # the engine's layout (see Engine.__init__)
    graphdef, params = nnx.split(model)
    sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    params = jax.tree.map(sds, params, state_shardings(params, mesh))
    leaves, ptree = jax.tree.flatten(params)
    by_batch = lambda x: sds(x, batch_sharding(mesh, x.shape))  # noqa: E731
    state = jax.tree.map(by_batch, jax.eval_shape(lambda: model.init_state(batch, max_context, kv_layout)))
    pend = by_batch(jax.ShapeDtypeStruct((batch, cfg.hc_mult, cfg.dim), jnp.dtype(cfg.dtype)))
    row = lambda *shape: by_batch(jax.ShapeDtypeStruct((batch,) + shape, jnp.int32))  # noqa: E731
    ratios = tuple(cfg.compress_ratios[: cfg.num_hidden_layers + cfg.n_mtp])
    repl = lambda x: sds(x, NamedSharding(mesh, P()))  # noqa: E731
    f32, i32 = repl(jax.ShapeDtypeStruct((), jnp.float32)), repl(jax.ShapeDtypeStruct((), jnp.int32))
    knobs = (f32, i32, f32, i32)  # temperature, top_k, top_p, vocab_limit
    key = repl(jax.eval_shape(lambda: jax.random.key(0)))
    ctl = repl(jax.ShapeDtypeStruct((3, batch), jnp.int32))
    chunk = min(chunk, max_context)
    out = {}
    with jax.set_mesh(mesh):
        prefill = _prefill_fn(graphdef, ptree, ratios, max_context, bool(cfg.n_mtp))
        out["prefill"] = aot.compile_report(prefill.lower(leaves, row(chunk), row(), row(), state, pend), devices)
        decode = _decode_fn(graphdef, ptree, ratios, max_context)
        out["decode"] = aot.compile_report(decode.lower(leaves, ctl, state, pend, key, *knobs), devices)
    per_device = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize  # noqa: E731
                                  for x in jax.tree.leaves(tree))
    for name, n_tok in (("prefill", chunk * batch), ("decode", batch)):
        out[name].update(tokens_per_call=n_tok, params_bytes_per_device=per_device(leaves),
                         state_bytes_per_device=per_device(state))
    return out
