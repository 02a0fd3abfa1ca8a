"""Evaluation: whether a model uses its context.

  likelihood   target log-probabilities of token sequences through the decode engine (chunked prefill
               over the engine's state, so a document longer than one forward costs no S x S buffer),
               plus the CSA indexer's top-k at a chosen position
  perplexity   `infer.py eval --task ppl`: perplexity and bits per byte, loss by position bucket
  niah         `infer.py eval --task niah`: RULER-style needle-in-a-haystack grids, generated at run
               time with the checkpoint's tokenizer; exact-match scoring; indexer recall of the needle
  cli          the `infer.py eval` command (progress bar, atomic JSON result, a table on stdout)

The lm-eval-harness adapter is `v4jax.lm_eval` (`python -m v4jax.lm_eval --model_args checkpoint=DIR ...`).
"""
