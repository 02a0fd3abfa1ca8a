"""lm-evaluation-harness adapter: evaluate a v4jax checkpoint with `lm-eval` (pip install lm-eval).

  python -m v4jax.lm_eval --model v4jax --model_args checkpoint=DIR[,max_context=4096,dtype=float32,
                          weights=native,kv_dtype=fp8,tokenizer=tokenizer.json,mode=chat]
                          --tasks TASKS [--batch_size 8] [--include_path MY_TASKS/] [any lm-eval option]

or from Python, after `import v4jax.lm_eval` (which registers the model name "v4jax"):

  lm_eval.simple_evaluate(model="v4jax", model_args="checkpoint=DIR", tasks=[...])

Requests go through the decode engine in batches of `batch_size` rows (v4jax.evaluation.likelihood):
  loglikelihood          BOS + context + continuation; the continuation's summed log-probability and
                         whether greedy decoding would produce it (a context longer than max_context
                         is cut from the left)
  loglikelihood_rolling  BOS + the text, in windows of max_context tokens, each token predicted once
  generate_until         greedy (or sampled: do_sample / temperature) up to max_gen_toks, cut at `until`
The chat template (`--apply_chat_template`) is DeepSeek-V4's, in `mode` (chat | think-high | think-max).
"""
from __future__ import annotations


import numpy as np
from tqdm import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the adapter is an extra
    raise ImportError("v4jax.lm_eval needs the lm-eval package: pip install lm-eval "
                      "(or pip install -e '.[eval]')") from e

from . import api, chat
from .evaluation import likelihood
from .sampling import SamplingConfig
from .serving import generate


def _int(v, name):
    if isinstance(v, str) and v.startswith("auto"):
        return 1
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"v4jax lm-eval model: {name} must be an integer, got {v!r}") from None
    if v < 1:
        raise ValueError(f"v4jax lm-eval model: {name} must be >= 1, got {v}")
    return v


@register_model("v4jax")
class V4JaxLM(LM):
    """A v4jax checkpoint as an lm-eval model (see the module docstring for its arguments)."""

    def __init__(self, checkpoint: str, max_context=4096, batch_size=1, dtype: str = "float32",
                 weights: str = "native", kv_dtype: str | None = None, tokenizer: str | None = None,
                 max_gen_toks=256, mode: str = "chat", **_ignored):  # device, max_batch_size: lm-eval's own
        super().__init__()
        if mode not in chat.MODES:
            raise ValueError(f"v4jax lm-eval model: unknown mode '{mode}': use one of {', '.join(chat.MODES)}")
        self.batch = _int(batch_size, "batch_size")
        self.max_gen_toks, self.mode = _int(max_gen_toks, "max_gen_toks"), mode
        loaded = _ignored.pop("_loaded", None)
        self.model = loaded or api.load(checkpoint, weights=weights, dtype=dtype, kv_layout=kv_dtype or None,
                                        max_context=_int(max_context, "max_context"), tokenizer=tokenizer)
        self.tok, self.cfg = self.model.tokenizer, self.model.config
        self.max_context = self.model.max_context
        self.bos = self.cfg.bos_token_id

    @classmethod
    def from_loaded(cls, model, batch_size=1, max_gen_toks=256, mode: str = "chat") -> "V4JaxLM":
        """Wrap a model already loaded with v4jax.load (its max_context, tokenizer and engines)."""
        return cls(checkpoint=model.path, batch_size=batch_size, max_gen_toks=max_gen_toks, mode=mode, _loaded=model)

    # ------------------------------------------------------------------ helpers
    def _enc(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """BOS + context + continuation tokens (the continuation tokenized as part of the whole, trailing
        context spaces moved to it) -> (tokens, number of continuation tokens)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self._enc(context)
        whole = self._enc(context + continuation)
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self._enc(continuation)
        if not cont:
            raise ValueError(f"lm-eval request with an empty continuation (context ends {context[-40:]!r})")
        seq = [self.bos] + ctx + cont
        return seq[-(self.max_context + 1):], len(cont)

    def _bar(self, n: int, what: str, disable: bool):
        return tqdm(total=n, desc=f"v4jax {what}", disable=disable or None)

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self._pair(*r.args) for r in requests]
        eng = self.model.engine(self.batch)
        bar = self._bar(len(pairs), "loglikelihood", disable_tqdm)
        out = []
        for g in range(0, len(pairs), 256):  # score_many sorts within a slice: similar lengths share a batch
            part = pairs[g: g + 256]
            res = likelihood.score_many(eng, [np.asarray(s) for s, _ in part])
            for (s, n), r, req in zip(part, res, requests[g: g + 256]):
                ans = (float(r["logp"][-n:].sum()), bool(r["greedy"][-n:].all()))
                self.cache_hook.add_partial("loglikelihood", req.args, ans)
                out.append(ans)
            bar.update(len(part))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        eng = self.model.engine(self.batch)
        out = []
        for req in tqdm(requests, desc="v4jax loglikelihood_rolling", disable=disable_tqdm or None):
            (text,) = req.args[:1]
            toks = [self.bos] + self._enc(text)
            if len(toks) < 2:
                out.append(0.0)
                continue
            wins = [w for _, w in likelihood.windows(toks, self.max_context)]
            total = float(sum(r["logp"].sum() for r in likelihood.score_many(eng, wins)))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def _sampling(self, kw: dict) -> tuple[SamplingConfig, int]:
        kw = dict(kw or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        n = _int(kw.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        temp = float(kw.pop("temperature", 0.0) or 0.0) if kw.pop("do_sample", True) is not False else 0.0
        return SamplingConfig(temperature=temp, top_p=float(kw.pop("top_p", 1.0) or 1.0),
                              top_k=int(kw.pop("top_k", 0) or 0), max_new_tokens=n,
                              stop_strings=tuple(until), seed=int(kw.pop("seed", 0) or 0)), n

    def generate_until(self, requests, disable_tqdm: bool = False):
        eng = self.model.engine(self.batch)
        out = [None] * len(requests)
        groups: dict = {}
        for i, r in enumerate(requests):
            sp, n = self._sampling(r.args[1])
            groups.setdefault(sp, []).append(i)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for sp, idx in groups.items():
            room = self.max_context - sp.max_new_tokens - 2
            if room < 2:
                raise ValueError(f"max_gen_toks {sp.max_new_tokens} leaves no room for a prompt in max_context "
                                 f"{self.max_context}")
            for g in range(0, len(idx), self.batch):
                rows = idx[g: g + self.batch]
                prompts = [([self.bos] + self._enc(requests[i].args[0]))[-room:] for i in rows]
                prompts += [[self.bos]] * (self.batch - len(rows))
                eng.reset()
                res = generate(eng, prompts, sp, self.tok)
                for i, gen in zip(rows, res["outputs"]):
                    out[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                bar.update(len(rows))
        bar.close()
        return out

    # ------------------------------------------------------------------ chat template
    @property
    def tokenizer_name(self) -> str:
        return f"v4jax-{self.mode}"

    def chat_template(self, chat_template=False) -> str:
        return f"deepseek-v4 ({self.mode})"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return chat.render([dict(m) for m in chat_history], mode=self.mode, texts=self.model.texts)


def main() -> None:
    """lm-eval's own command line, with the "v4jax" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
