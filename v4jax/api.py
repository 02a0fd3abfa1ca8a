"""The Python API: `v4jax.load(path)` -> a `LoadedModel` with `generate`, `chat` and `score`, following
`infer.py generate / chat / score` (loading, prompts, sampling, refusals). Decode engines are built on
first use and kept (each new one compiles its steps): one per (batch, speculative), each holding a
state of `max_context` tokens; generate and chat share the batch-1 engine.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np

WEIGHTS = ("native", "bf16")
DTYPES = ("float32", "bfloat16")
KV_LAYOUTS = ("fp8", "bfloat16", "float32")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, choices))}")


def load(path, *, weights: str = "native", dtype: str = "float32", kv_layout: str | None = None,
         max_context: int = 4096, tokenizer=None, mesh=None, prompt_texts=None, **runtime) -> LoadedModel:
    """A checkpoint ready to generate, chat and score.

    path: a hub-format directory (config.json + *.safetensors [+ tokenizer.json]) or a train.py --out
    directory (its latest checkpoint). weights: "native" keeps a quantised checkpoint's FP8 / FP4
    tensors as stored, "bf16" dequantises them to `dtype` while loading. kv_layout: the decode state's
    layout (None: the compute dtype). tokenizer: a tokenizer.json path or a tokenizer object (default:
    PATH/tokenizer.json, else the byte tokenizer). mesh: a jax Mesh or a spec like "data=2,tensor=2".
    prompt_texts: the official prompt blocks (a JSON / encoding_dsv4.py path or a chat.PromptTexts).
    **runtime: ModelConfig run-time keys (param_dtype, qat_sim, attention_kernel, moe_kernel, ...)."""
    from . import chat
    from .config import RUNTIME_KEYS
    from .data import load_tokenizer
    from .validate import ConfigError, near_miss

    _choice("weights", weights, WEIGHTS)
    _choice("dtype", dtype, DTYPES)
    _choice("kv_layout", kv_layout, (None, *KV_LAYOUTS))
    keys = [k for k in RUNTIME_KEYS if k != "native_weights"]  # that one is `weights`
    for key in runtime:
        if key not in keys:
            hint = near_miss(key, keys)
            raise ConfigError(f"load(): unknown keyword '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
                              + f"; run-time keys: {', '.join(keys)}")
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise ValueError(f"max_context must be an integer >= 1, got {max_context!r}")
    path = os.fspath(path)
    tok = tokenizer if hasattr(tokenizer, "encode") else load_tokenizer(
        tokenizer, default=os.path.join(path, "tokenizer.json"))
    texts = (prompt_texts or chat.DEFAULT_TEXTS) if prompt_texts is None or isinstance(
        prompt_texts, chat.PromptTexts) else chat.load_prompt_texts(prompt_texts)
    if isinstance(mesh, (str, dict)):
        from .sharding import make_mesh
        mesh = make_mesh(mesh)
    runtime = {"dtype": dtype, "param_dtype": dtype, **runtime, "native_weights": weights == "native"}
    module = load_module(path, mesh, **runtime)
    limit = module.cfg.max_position_embeddings
    if max_context > limit:
        raise ValueError(f"max_context must be within 1..{limit} (max_position_embeddings), got {max_context}")
    return LoadedModel(module, tok, max_context=max_context, kv_layout=kv_layout, texts=texts, path=path)


def load_module(path: str, mesh=None, **runtime):
    """The nnx Transformer of a hub-format directory (any *.safetensors in it) or of a train.py run
    directory (orbax checkpoints + config.json), placed on `mesh` (default: one device)."""
    from . import checkpoint
    from .trainer import load_trained

    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: " + ("a file, not a checkpoint directory"
                                                        if os.path.exists(path) else "no such directory"))
    files = os.listdir(path)
    if any(f.endswith(".safetensors") for f in files):
        return checkpoint.load_hub(path, mesh=mesh, **runtime)
    if "config.json" not in files:
        raise checkpoint.CheckpointError(f"{path}: neither a hub-format checkpoint (no *.safetensors) nor a "
                                         "train.py run directory (no config.json)")
    runtime.pop("native_weights", None)  # a training run holds float master weights, nothing quantised
    module = load_trained(path, **runtime)
    return module if mesh is None else _place(module, mesh)


def _place(module, mesh):
    """`module` with every variable sharded on `mesh` by the rules table (as load_hub places them)."""
    import jax
    from flax import nnx

    from .sharding import state_shardings

    graphdef, state = nnx.split(module)
    flat_sh = dict(nnx.to_flat_state(state_shardings(state, mesh)))
    return nnx.merge(graphdef, nnx.from_flat_state([
        (p, v.replace(jax.device_put(v.get_value(), flat_sh[p].get_value())))
        for p, v in nnx.to_flat_state(state)]))


def _sampling(max_new_tokens, temperature, top_k, top_p, seed, stop, speculative):
    """A SamplingConfig, after infer.py's checks of its sampling options (naming the keyword arguments)."""
    from .sampling import SamplingConfig

    for name, value, ok, want in (
            ("temperature", temperature, math.isfinite(temperature) and temperature >= 0,
             "a finite number >= 0 (0 = greedy)"),
            ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
            ("top_k", top_k, top_k >= 0, ">= 0 (0 = off)"),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value}")
    if speculative and temperature != 0:
        raise ValueError(f"speculative=True reproduces greedy decoding: use temperature=0, not {temperature}")
    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
                          stop_strings=(stop,) if isinstance(stop, str) else tuple(stop))


class LoadedModel:
    """A loaded checkpoint: `.config`, `.module` (the nnx Transformer), `.tokenizer`, and
    `generate` / `chat` / `score`. `.last_result` is the last generate / chat call's full result
    (serving.generate's dict with the Generation of every row, or ChatSession.send's reply dict)."""

    def __init__(self, module, tokenizer, max_context: int = 4096, kv_layout: str | None = None,
                 texts=None, path: str | None = None):
        from . import chat

        self.module, self.config, self.tokenizer = module, module.cfg, tokenizer
        self.max_context, self.kv_layout, self.path = max_context, kv_layout, path
        self.texts = texts or chat.DEFAULT_TEXTS
        self.last_result = None
        self._engines: dict = {}  # (batch, speculative) -> Engine
        self._decode_module = None  # the per-layer layout every engine runs (made once, shared)
        self._session = None  # the chat() conversation
        self._chat_stale = False  # generate() reused the chat engine: the next turn prefills afresh

    def __repr__(self):
        return (f"LoadedModel({self.path!r}: {self.config.num_hidden_layers} layers, vocab {self.config.vocab_size}, "
                f"max_context {self.max_context})")

    def engine(self, batch: int = 1, speculative: bool = False):
        """The decode engine for `batch` rows (built, and its steps compiled, on first use)."""
        from .checkpoint import relayout
        from .engine import Engine

        key = (batch, bool(speculative))
        if key not in self._engines:
            if self._decode_module is None:  # Engine would relayout a scanned stack itself, once per engine
                scanned = any(seg.reps > 1 for seg in self.module.plan)
                self._decode_module = relayout(self.module, scan_layers=False) if scanned else self.module
            self._engines[key] = Engine(self._decode_module, self.max_context, batch=batch,
                                        kv_layout=self.kv_layout, speculative=bool(speculative),
                                        min_bucket=min(1024, self.max_context))
        return self._engines[key]

    def prompt_ids(self, prompt: str, mode: str = "raw") -> list[int]:
        """The tokens `generate` feeds for `prompt`: raw text with BOS in front, or one user turn
        rendered in a reasoning mode (as `infer.py generate --mode`)."""
        from . import chat

        modes = chat.MODES + ("raw",)
        if mode not in modes:
            raise ValueError(f"unknown mode '{mode}': use one of {', '.join(modes)}")
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
        if mode != "raw":
            prompt = chat.render([{"role": "user", "content": prompt}], mode=mode, texts=self.texts)
        ids = list(self.tokenizer.encode(prompt))
        if mode == "raw" and (not ids or ids[0] != self.config.bos_token_id):
            ids = [self.config.bos_token_id] + ids
        return ids

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, mode: str = "raw", speculative: bool = False, seed: int = 0,
                 stop=(), on_text=None):
        """The continuation of `prompt` (str -> str; a list of prompts, decoded as one batch -> a list).

        mode: "raw" (the text as is, BOS added) or a reasoning mode ("chat", "think-high", "think-max":
        the prompt is one user message). temperature 0 is greedy; speculative=True drafts with the MTP
        block (greedy only, same output). stop: stop strings (never part of the text). on_text(row,
        piece) receives the text as it is generated."""
        from .serving import generate

        sampling = _sampling(max_new_tokens, temperature, top_k, top_p, seed, stop, speculative)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("generate: no prompts given (an empty list)")
        ids = [self.prompt_ids(p, mode) for p in prompts]
        eng = self.engine(len(ids), speculative)
        if self._session is not None and self._session.engine is eng:
            self._chat_stale = True
        eng.reset()
        res = generate(eng, ids, sampling, self.tokenizer, on_text, speculative=speculative)
        self.last_result = res
        texts = [g.text for g in res["outputs"]]
        return texts[0] if single else texts

    # ------------------------------------------------------------------ chat
    def _chat_session(self, speculative: bool):
        from .serving import ChatSession

        eng = self.engine(1, speculative)
        s = self._session
        if s is None or s.engine is not eng:  # a new conversation, or the old one carried to this engine
            eng.reset()
            new = ChatSession(eng, self.tokenizer, texts=self.texts, speculative=bool(speculative))
            new.messages = list(s.messages) if s is not None else []
            self._session, self._chat_stale = new, False
        elif self._chat_stale:  # the state is generate()'s: prefill the conversation again
            eng.reset()
            s.tokens, s.snaps, self._chat_stale = [], [], False
        return self._session

    def chat(self, message: str, mode: str = "chat", max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop=(), speculative: bool = False,
             on_text=None) -> str:
        """Send `message` as the next user turn of one conversation kept across calls -> the reply's
        content (its reasoning and tool calls are in `.messages[-1]`). A reply is capped to the room
        left in max_context (with a warning); `reset_chat()` starts a new conversation."""
        from . import chat
        from .cli_chat import reply_room

        if mode not in chat.MODES:
            raise ValueError(f"unknown mode '{mode}': use one of {', '.join(chat.MODES)}")
        if not isinstance(message, str):
            raise TypeError(f"a message must be a string, got {type(message).__name__}")
        sampling = _sampling(max_new_tokens, temperature, top_k, top_p, seed, stop, speculative)
        s = self._chat_session(speculative)
        s.mode = mode
        used, room = reply_room(s, message)
        if max_new_tokens and room < 1:
            raise ValueError(f"this message would fill the context ({used} of max_context {self.max_context} "
                             "tokens): shorten it, or reset_chat() to start a new conversation")
        n = max(0, min(max_new_tokens, room))
        if n < max_new_tokens:
            warnings.warn(f"reply capped at {n} new tokens: {used} of max_context {self.max_context} are in use",
                          stacklevel=2)
        s.sampling = dataclasses.replace(sampling, max_new_tokens=n)
        keep = len(s.messages)
        try:
            res = s.send(message, on_text=on_text)
        except BaseException:  # a refused or interrupted turn: the conversation as before it
            del s.messages[keep:]
            self._chat_stale = True
            raise
        self.last_result = res
        return res["content"]

    @property
    def messages(self) -> list[dict]:
        """The conversation so far (a copy): user and assistant messages, oldest first."""
        return [dict(m) for m in self._session.messages] if self._session is not None else []

    def reset_chat(self) -> None:
        """Forget the conversation; the next `chat` starts a new one."""
        self._session = None

    # ------------------------------------------------------------------ scoring
    def score(self, tokens, prefill: int | None = None) -> np.ndarray:
        """Logits [B, S, V] float32 for every position of `tokens` (an integer array [B, S] or [S], or
        a text: BOS + its tokens), from one full forward, or with `prefill=N` from a prefill of N tokens
        then one-token decode steps (as `infer.py score`)."""
        from . import scoring

        if isinstance(tokens, str):
            tokens = [self.prompt_ids(tokens, "raw")]
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if prefill is not None and (arr.ndim != 2 or not 0 < prefill <= arr.shape[-1]):
            raise ValueError(f"prefill must be within 1..{arr.shape[-1]} (the sequence length), got {prefill}")
        return scoring.score(self.module, arr, prefill=prefill, with_mtp=False)["logits"]
