"""`python infer.py serve`: load a checkpoint, compile every step shape, serve until SIGTERM / Ctrl-C.

On SIGTERM (or SIGINT) the server stops admitting (new requests: 503; waiting ones: a 503 error),
lets the requests in slots finish for up to --drain-timeout seconds, ends the rest with a final
error event, and exits 0.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

SERVE_DOC = "an OpenAI-compatible HTTP server with continuous batching (v4jax/server)"


def add_parser(add, model_options) -> None:
    s = add("serve", SERVE_DOC)
    model_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    s.add_argument("--slots", type=int, default=8, help="decode slots: requests decoded together")
    s.add_argument("--max-context", type=int, default=4096, dest="max_context",
                   help="tokens each slot holds (prompt and reply)")
    s.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default=None, dest="kv_dtype",
                   help="decode-state layout (default: the compute dtype)")
    s.add_argument("--chunk", type=int, default=256, help="prompt tokens prefilled per step (all slots together)")
    s.add_argument("--prefix-cache-mb", type=float, default=1024, dest="prefix_cache_mb",
                   help="host memory for cached prefix states, LRU (0: no prefix cache)")
    s.add_argument("--max-queue", type=int, default=64, dest="max_queue",
                   help="requests waiting for a slot before new ones get 429")
    s.add_argument("--mode", default="chat", help="default reasoning mode: chat | think-high | think-max")
    s.add_argument("--default-max-tokens", type=int, default=1024, dest="default_max_tokens",
                   help="reply length when a request gives no max_tokens (capped to the context left)")
    s.add_argument("--served-model-name", default=None, dest="served_model_name",
                   help="the model id clients name (default: the checkpoint directory's name)")
    s.add_argument("--drain-timeout", type=float, default=30.0, dest="drain_timeout",
                   help="seconds requests in slots may take to finish after SIGTERM")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   dest="log_level", help="uvicorn's log level")


def check_args(args) -> None:
    from .. import chat

    for flag, value, ok, want in (
            ("--slots", args.slots, args.slots >= 1, ">= 1"),
            ("--max-context", args.max_context, args.max_context >= 2, ">= 2"),
            ("--chunk", args.chunk, args.chunk >= 16, ">= 16"),
            ("--prefix-cache-mb", args.prefix_cache_mb, args.prefix_cache_mb >= 0, ">= 0"),
            ("--max-queue", args.max_queue, args.max_queue >= 1, ">= 1"),
            ("--default-max-tokens", args.default_max_tokens, args.default_max_tokens >= 1, ">= 1"),
            ("--drain-timeout", args.drain_timeout, args.drain_timeout >= 0, ">= 0"),
            ("--port", args.port, 0 <= args.port < 65536, "in 0..65535")):
        if not ok:
            raise ValueError(f"{flag} must be {want}, got {value}")
    if args.mode not in chat.MODES:
        raise ValueError(f"unknown mode '{args.mode}': use one of {', '.join(chat.MODES)}")


def build(model, tokenizer, texts, *, slots: int, max_context: int, kv_layout=None, chunk: int = 256,
          prefix_cache_bytes: int = 1 << 30, max_queue: int = 64, mode: str = "chat", default_max_tokens: int = 1024,
          model_name: str = "v4jax", warm: bool = True, progress=None):
    """(Service, FastAPI app) for a loaded model; the scheduler thread is started."""
    from ..serving import kv_report
    from .app import Service, create_app
    from .scheduler import Scheduler
    from .slots import Slots
    from .state_cache import StateCache

    sl = Slots(model, max_context, slots, kv_layout=kv_layout, chunk=chunk)
    if warm:
        sl.warm(progress)
    kv = kv_report(sl.cfg, max_context, kv_layout or sl.cfg.dtype)
    cache = StateCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
    sched = Scheduler(sl, tokenizer, cache, max_queue=max_queue, kv_bytes_per_token=kv["bytes_per_token"],
                      kv_fixed_bytes=kv["fixed_bytes"]).start()
    svc = Service(sched, tokenizer, texts, model_name, max_context, mode=mode, default_max_tokens=default_max_tokens)
    return svc, create_app(svc)


def run(args, load_model) -> int:
    import uvicorn

    from .. import chat
    from ..data import load_tokenizer
    from ..sharding import make_mesh

    check_args(args)
    tok = load_tokenizer(args.tokenizer, default=os.path.join(args.checkpoint, "tokenizer.json"))
    texts = chat.load_prompt_texts(args.prompt_texts) if args.prompt_texts else chat.DEFAULT_TEXTS
    t0 = time.time()
    model = load_model(args.checkpoint, make_mesh(args.mesh) if args.mesh else None, dtype=args.dtype,
                       param_dtype=args.dtype, native_weights=args.weights == "native")
    print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s; compiling the step shapes", file=sys.stderr)
    t0 = time.time()
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    svc, app = build(model, tok, texts, slots=args.slots, max_context=args.max_context, kv_layout=args.kv_dtype,
                     chunk=args.chunk, prefix_cache_bytes=int(args.prefix_cache_mb * 2 ** 20), max_queue=args.max_queue,
                     mode=args.mode, default_max_tokens=args.default_max_tokens, model_name=name,
                     progress=lambda n: print(f"  compiled {n} step shapes", file=sys.stderr, flush=True))
    sl = svc.scheduler.slots
    print(f"ready in {time.time() - t0:.1f}s: {sl.compiled_shapes()} step shapes, {args.slots} slots x "
          f"{args.max_context} tokens, model id {name!r}", file=sys.stderr, flush=True)
    server = _draining_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                             timeout_graceful_shutdown=args.drain_timeout + 10),
                              svc.scheduler, args.drain_timeout)
    server.run()
    svc.scheduler.stop()
    return 0


def _draining_server(config, scheduler, drain_timeout: float):
    """A uvicorn.Server whose exit signal first drains the scheduler (see the module docstring)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        _drainer: threading.Thread | None = None

        def handle_exit(self, sig, frame) -> None:
            if self._drainer is None:
                scheduler.drain()
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
            # as uvicorn's own handler, without recording the signal: uvicorn re-raises recorded signals
            # once it has shut down, and the process would end by SIGTERM instead of exiting 0
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

        def _drain(self) -> None:
            end = time.monotonic() + drain_timeout
            while not scheduler.idle() and time.monotonic() < end:
                time.sleep(0.05)
            scheduler.stop()  # anything still in a slot ends with a final error event

    return DrainingServer(config)
