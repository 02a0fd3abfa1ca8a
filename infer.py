"""v4jax inference command line.

  python infer.py generate --checkpoint DIR --prompt TEXT [--mode chat|think-high|think-max|raw]
                        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
                        [--stop STR ...] [--speculative] [--max-context N] [--kv-dtype fp8|bfloat16]
                        [--tokenizer tokenizer.json] [--prompt-texts FILE] [--mesh data=2,tensor=2]
  python infer.py chat --checkpoint DIR [same options]   interactive; /title /query /action /domain
                        /authority /read_url URL answer quick instructions, /reset, /exit
  python infer.py kv-report --config CONFIG.json --context N [--kv-dtype fp8|bfloat16]
  python infer.py compile --config CONFIG --topology v6e:2x4 --max-context 1048576 [--kv-dtype fp8]
                        [--batch B] [--chunk N] [--mesh expert=8] [--dtype bfloat16] [--weights native|bf16]
                        the engine's prefill-chunk and decode steps compiled for a TPU slice (needs
                        libtpu, no TPU): per-device memory against HBM, fits, compile seconds (JSON)
  python infer.py render --messages MESSAGES.json [--tools TOOLS.json] [--mode ...] [--prompt-texts FILE]
  python infer.py score --checkpoint DIR --tokens TOKENS.npy --out OUT.npz [--prefill N]
                        [--dtype float32|bfloat16] [--qat-sim] [--mesh data=2,tensor=2] [--weights native|bf16]

DIR is a hub-format directory (config.json + *.safetensors [+ tokenizer.json]) or a train.py --out
directory. Without a tokenizer.json the byte tokenizer is used (the tiny default). The FP8 / FP4 tensors
of a quantised hub checkpoint stay in their formats on device (`--weights native`, the default; `bf16`
dequantises them while loading).

`score` writes `logits` [B, S, V] float32 for every position (one full forward, or with --prefill N
a prefill of N tokens followed by one-token decode steps) and, when the model has an MTP block,
`mtp_logits` [B, S-1, V]: position t is the MTP block on the final streams at t with token t+1.
The output file is written atomically: on any error nothing is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


WEIGHTS_HELP = ("native (default): FP8/FP4 tensors of a quantised checkpoint stay as stored, dequantised inside "
                "each step; bf16: dequantised to --dtype while loading (the weights take 2-4x the memory)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="logits for every position of given token sequences")
    s.add_argument("--checkpoint", required=True,
                   help="hub-format directory (config.json + *.safetensors) or a train.py --out directory")
    s.add_argument("--tokens", required=True, help=".npy integer array [B, S]")
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--prefill", type=int, default=None, help="prefill N tokens, then decode one at a time")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    s.add_argument("--qat-sim", action="store_true", help="official FP8 KV / FP4 indexer simulations")
    s.add_argument("--mesh", default=None, help="e.g. data=2,expert=2,tensor=2 (default: one device)")
    s.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)

    for name in ("generate", "chat"):
        g = sub.add_parser(name, help="sample a reply to --prompt" if name == "generate" else "interactive chat")
        g.add_argument("--checkpoint", required=True)
        if name == "generate":
            g.add_argument("--prompt", required=True)
        g.add_argument("--mode", default="chat", help="chat | think-high | think-max" + (" | raw" if name == "generate" else ""))
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--top-k", type=int, default=0)
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        g.add_argument("--speculative", action="store_true", help="MTP speculative decoding (greedy)")
        g.add_argument("--max-context", type=int, default=4096)
        g.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default=None,
                       help="decode-state layout (default: the compute dtype)")
        g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
        g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DIR/tokenizer.json, else bytes)")
        g.add_argument("--prompt-texts", default=None, help="official prompt blocks: JSON or encoding_dsv4.py")
        g.add_argument("--mesh", default=None)
        g.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)

    k = sub.add_parser("kv-report", help="decode-state bytes of one sequence (JSON)")
    k.add_argument("--config", required=True, help="config.json, a directory holding one, or a configs/ name")
    k.add_argument("--context", type=int, required=True)
    k.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default="bfloat16")

    c = sub.add_parser("compile", help="compile the decode steps for a TPU slice; print the memory plan (JSON)")
    c.add_argument("--config", required=True, help="config.json, a directory holding one, or a configs/ name")
    c.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1, v6e:2x4")
    c.add_argument("--max-context", type=int, required=True, dest="max_context")
    c.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default=None, dest="kv_dtype")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    c.add_argument("--mesh", default=None, help="default: every device on the expert axis")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="compute and parameter dtype (default bfloat16)")
    c.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model run-time key, e.g. attention_kernel=pallas_tpu, moe_kernel=megablox")

    r = sub.add_parser("render", help="print the prompt text of a conversation")
    r.add_argument("--messages", required=True, help="JSON list of messages (or {messages, tools})")
    r.add_argument("--tools", default=None)
    r.add_argument("--mode", default="chat")
    r.add_argument("--prompt-texts", default=None)
    return p


def cmd_score(args) -> int:
    import numpy as np

    from v4jax import scoring
    from v4jax.serving import save_npz_atomic
    from v4jax.sharding import make_mesh

    if not os.path.exists(args.tokens):
        raise SystemExit(f"error: no tokens file {args.tokens}")
    tokens = np.load(args.tokens)
    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.time()
    model = load_model(args.checkpoint, mesh, dtype=args.dtype, param_dtype=args.dtype, qat_sim=args.qat_sim,
                       native_weights=args.weights == "native")
    tokens = scoring.check_tokens(tokens, model.cfg.vocab_size)
    print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s; scoring {tokens.shape[0]}x{tokens.shape[1]} tokens",
          file=sys.stderr)
    t0 = time.time()
    out = scoring.score(model, tokens, prefill=args.prefill)
    print(f"scored in {time.time() - t0:.1f}s", file=sys.stderr)
    save_npz_atomic(args.out, out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()))
    return 0


def cmd_kv_report(args) -> int:
    import json

    from v4jax.config import ModelConfig
    from v4jax.serving import kv_report

    cfg = ModelConfig.from_hub(_config_path(args.config))
    if not 0 < args.context <= cfg.max_position_embeddings:
        raise ValueError(f"--context must be within 1..{cfg.max_position_embeddings}, got {args.context}")
    print(json.dumps(kv_report(cfg, args.context, args.kv_dtype), indent=1))
    return 0


def _config_path(name: str) -> str:
    from v4jax.config import CONFIG_DIR
    if not os.path.exists(name) and os.path.exists(os.path.join(CONFIG_DIR, name + ".json")):
        return os.path.join(CONFIG_DIR, name + ".json")
    return name


def cmd_compile(args) -> int:
    import json

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the topology API beside the CPU backend, no TPU runtime
    from v4jax import aot, engine
    from v4jax.config import ModelConfig, parse_runtime

    devices = aot.tpu_devices(args.topology)
    runtime = {"dtype": args.dtype, "param_dtype": args.dtype, "native_weights": args.weights == "native",
               **parse_runtime(args.set)}  # --set may override --dtype
    cfg = ModelConfig.from_hub(_config_path(args.config), **runtime)
    if not 0 < args.max_context <= cfg.max_position_embeddings:
        raise ValueError(f"--max-context must be within 1..{cfg.max_position_embeddings}, got {args.max_context}")
    mesh = aot.mesh_for(args.mesh, devices, prefer=("expert",))
    plan = engine.compile_plan(cfg, devices, mesh, args.max_context, args.kv_dtype, args.batch, args.chunk)
    print(json.dumps({"topology": args.topology, "config": args.config, "mesh": dict(mesh.shape),
                      "weights": args.weights if cfg.weight_format == "fp8" else cfg.param_dtype,
                      "max_context": args.max_context, "kv_dtype": args.kv_dtype or args.dtype, "batch": args.batch,
                      **{k: aot.public(v) for k, v in plan.items()}}, indent=1))
    return 0


def cmd_render(args) -> int:
    import json

    from v4jax import chat

    with open(args.messages, encoding="utf-8") as f:
        data = json.load(f)
    messages, tools = (data.get("messages"), data.get("tools")) if isinstance(data, dict) else (data, None)
    if args.tools:
        with open(args.tools, encoding="utf-8") as f:
            tools = json.load(f)
    texts = chat.load_prompt_texts(args.prompt_texts) if args.prompt_texts else None
    sys.stdout.write(chat.render(messages, tools=tools, mode=args.mode, texts=texts))
    return 0


def _session_parts(args):
    """(engine, tokenizer, prompt texts, sampling) for generate / chat."""
    from v4jax import chat
    from v4jax.data import load_tokenizer
    from v4jax.engine import Engine
    from v4jax.sampling import SamplingConfig
    from v4jax.sharding import make_mesh

    modes = chat.MODES + (("raw",) if args.cmd == "generate" else ())
    if args.mode not in modes:
        raise ValueError(f"unknown mode '{args.mode}': use one of {', '.join(modes)}")
    tok = load_tokenizer(args.tokenizer, default=os.path.join(args.checkpoint, "tokenizer.json"))
    texts = chat.load_prompt_texts(args.prompt_texts) if args.prompt_texts else chat.DEFAULT_TEXTS
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop))
    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.time()
    model = load_model(args.checkpoint, mesh, dtype=args.dtype, param_dtype=args.dtype,
                       native_weights=args.weights == "native")
    engine = Engine(model, args.max_context, kv_layout=args.kv_dtype, speculative=args.speculative,
                    min_bucket=min(1024, args.max_context))
    print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s", file=sys.stderr)
    return engine, tok, texts, sampling


def cmd_generate(args) -> int:
    from v4jax import chat
    from v4jax.serving import generate

    engine, tok, texts, sampling = _session_parts(args)
    if args.mode == "raw":
        text = args.prompt
    else:
        text = chat.render([{"role": "user", "content": args.prompt}], mode=args.mode, texts=texts)
    ids = list(tok.encode(text))
    if args.mode == "raw" and (not ids or ids[0] != engine.cfg.bos_token_id):
        ids = [engine.cfg.bos_token_id] + ids

    def stream(_, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = generate(engine, [ids], sampling, tok, stream, speculative=args.speculative)
    g = res["outputs"][0]
    sys.stdout.write("\n")
    extra = f", MTP acceptance {res['acceptance']:.2f}" if args.speculative else ""
    print(f"[{len(ids)} prompt tokens, {len(g.tokens)} new ({g.finish}); prefill {res['prefill_s']:.2f}s, "
          f"decode {res['tokens_per_s']:.1f} tokens/s{extra}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    import signal

    from v4jax import chat
    from v4jax.serving import ChatSession

    engine, tok, texts, sampling = _session_parts(args)
    session = ChatSession(engine, tok, args.mode, texts, sampling)
    print(f"v4jax chat ({args.mode}). /title /query /action /domain /authority /read_url URL, /reset, /exit; "
          "Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session = ChatSession(engine, tok, args.mode, texts, sampling)
            continue
        if cmd.startswith("/") and cmd[1:] in chat.TASKS:
            try:
                print(f"[{cmd[1:]}] {session.quick(cmd[1:], url=rest or None)}")
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        interrupted = []
        old = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
        try:
            reply = session.send(line, on_text=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()),
                                 should_stop=lambda: bool(interrupted))
        except ValueError as e:  # e.g. the conversation outgrew --max-context
            session.messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, old)
        print(f"\n[{reply['finish']}, {reply['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


def load_model(path: str, mesh=None, **runtime):
    """A hub-format directory (*.safetensors) or a v4jax training run directory (orbax checkpoints)."""
    from v4jax import checkpoint
    from v4jax.trainer import load_trained

    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"no checkpoint directory {path}")
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return checkpoint.load_hub(path, mesh=mesh, **runtime)
    runtime.pop("native_weights", None)  # a training run holds its fp32 master weights, nothing quantised
    return load_trained(path, **runtime)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "compile":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is first imported
    from v4jax.aot import AOTError
    from v4jax.checkpoint import CheckpointError
    from v4jax.config import ConfigError

    try:
        return {"score": cmd_score, "generate": cmd_generate, "chat": cmd_chat, "kv-report": cmd_kv_report,
                "render": cmd_render, "compile": cmd_compile}[args.cmd](args)
    except (AOTError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
