"""v4jax inference command line.

  python infer.py generate --checkpoint DIR --prompt TEXT [--mode chat|think-high|think-max|raw]
                        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
                        [--stop STR ...] [--speculative] [--max-context N] [--kv-dtype fp8|bfloat16]
                        [--tokenizer tokenizer.json] [--prompt-texts FILE] [--mesh data=2,tensor=2]
  python infer.py chat --checkpoint DIR [same options]   interactive; /title /query /action /domain
                        /authority /read_url URL answer quick instructions, /reset, /help, /exit
  python infer.py kv-report --config CONFIG.json --context N [--kv-dtype fp8|bfloat16]
  python infer.py compile --config CONFIG --topology v6e:2x4 --max-context 1048576 [--kv-dtype fp8]
                        [--batch B] [--chunk N] [--mesh expert=8] [--dtype bfloat16] [--weights native|bf16]
                        the engine's prefill-chunk and decode steps compiled for a TPU slice (needs
                        libtpu, no TPU): per-device memory against HBM, fits, compile seconds (JSON)
  python infer.py eval --checkpoint DIR --task ppl --data FILE|DIR | --task niah [--lengths 1024,4096]
                        [--depths ...] [--diagnose-indexer] [--out RESULT.json]   (v4jax/evaluation/cli.py)
  python infer.py serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--slots 8] [--max-context 4096]
                        [--kv-dtype fp8|bfloat16] [--mesh ...] [--prefix-cache-mb 1024] [--chunk 256]
                        an OpenAI-compatible server: /v1/chat/completions, /v1/completions,
                        /v1/quick_instruction, /v1/models, /health, /metrics (v4jax/server)
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

A refused input (a damaged or missing file, a bad key or value) is one line on stderr naming it, exit
code 2; every option's meaning and default: `python infer.py COMMAND --help`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


WEIGHTS_HELP = ("native: FP8/FP4 tensors of a quantised checkpoint stay as stored, dequantised inside each step; "
                "bf16: dequantised to --dtype while loading (the weights take 2-4x the memory)")
CHECKPOINT_HELP = "hub-format directory (config.json + *.safetensors) or a train.py --out directory"
CONFIG_HELP = "config.json, a directory holding one, or a configs/ name (e.g. deepseek-v4-flash)"
KV_HELP = "decode-state layout"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (None, False, []) or says it itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d == argparse.SUPPRESS or action.required or "default" in text:
            return text
        return text + " (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    s = add("score", "logits for every position of given token sequences (an .npz)")
    s.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    s.add_argument("--tokens", required=True, help=".npy integer array [B, S] of token ids")
    s.add_argument("--out", required=True, help="output .npz file (written atomically)")
    s.add_argument("--prefill", type=int, default=None,
                   help="prefill N tokens, then decode one at a time (default: one full forward)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and parameter dtype")
    s.add_argument("--qat-sim", action="store_true", help="official FP8 KV / FP4 indexer simulations")
    s.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,expert=2,tensor=2 (default: one device)")
    s.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)

    for name in ("generate", "chat"):
        _generation_options(add(name, "sample a reply to --prompt" if name == "generate" else
                                "interactive chat (/help lists its commands)"), name)

    k = add("kv-report", "decode-state bytes of one sequence (JSON)")
    k.add_argument("--config", required=True, help=CONFIG_HELP)
    k.add_argument("--context", type=int, required=True, help="sequence length in tokens")
    k.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default="bfloat16", help=KV_HELP)

    c = add("compile", "compile the decode steps for a TPU slice; print the memory plan (JSON)")
    c.add_argument("--config", required=True, help=CONFIG_HELP)
    c.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1, v6e:2x4 (needs libtpu)")
    c.add_argument("--max-context", type=int, required=True, dest="max_context", help="tokens the decode state holds")
    c.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default=None, dest="kv_dtype",
                   help=KV_HELP + " (default: --dtype)")
    c.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    c.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    c.add_argument("--mesh", default=None, help="device mesh (default: every device on the expert axis)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute and parameter dtype")
    c.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model run-time key, e.g. attention_kernel=pallas_tpu, moe_kernel=megablox (repeatable)")

    from v4jax.evaluation import cli as eval_cli
    eval_cli.add_parser(add, _model_options)
    from v4jax.server import cli as serve_cli
    serve_cli.add_parser(add, _model_options)

    r = add("render", "print the prompt text of a conversation")
    r.add_argument("--messages", required=True, help="JSON list of messages (or an object {messages, tools})")
    r.add_argument("--tools", default=None, help="JSON list of tools (default: the messages file's, if any)")
    r.add_argument("--mode", default="chat", help="reasoning mode: chat | think-high | think-max")
    r.add_argument("--prompt-texts", default=None,
                   help="official prompt blocks: JSON or encoding_dsv4.py (default: v4jax's own wording)")
    return p


def _generation_options(g: argparse.ArgumentParser, name: str) -> None:
    """The options generate and chat share (generate also takes --prompt and --mode raw)."""
    g.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    if name == "generate":
        g.add_argument("--prompt", required=True, help="the user message (with --mode raw: the whole prompt)")
        g.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the prefill and decode "
                       "to DIR (TensorBoard's profile plugin, Perfetto; default: none)")
    g.add_argument("--mode", default="chat", help="reasoning mode: chat | think-high | think-max"
                   + (" | raw (the prompt as is, BOS added)" if name == "generate" else ""))
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate at most" + (" per reply" if name == "chat" else ""))
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1], 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens, 0 = off")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
    g.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (greedy only); reports the draft acceptance rate")
    g.add_argument("--max-context", type=int, default=4096, help="tokens the decode state holds")
    g.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default=None,
                   help=KV_HELP + " (default: the compute dtype)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and parameter dtype")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DIR/tokenizer.json, else bytes)")
    g.add_argument("--prompt-texts", default=None,
                   help="official prompt blocks: JSON or encoding_dsv4.py (default: v4jax's own wording)")
    g.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,tensor=2 (default: one device)")
    g.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)


def _model_options(g: argparse.ArgumentParser) -> None:
    """Loading options of `eval` (generate and chat have theirs in _generation_options)."""
    g.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and parameter dtype")
    g.add_argument("--weights", choices=("native", "bf16"), default="native", help=WEIGHTS_HELP)
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DIR/tokenizer.json, else bytes)")
    g.add_argument("--prompt-texts", default=None,
                   help="official prompt blocks: JSON or encoding_dsv4.py (default: v4jax's own wording)")
    g.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,tensor=2 (default: one device)")


def cmd_eval(args) -> int:
    from v4jax import api
    from v4jax.evaluation import cli as eval_cli

    def load():
        t0 = time.time()
        m = api.load(args.checkpoint, weights=args.weights, dtype=args.dtype, kv_layout=args.kv_dtype, max_context=1,
                     tokenizer=args.tokenizer, mesh=args.mesh, prompt_texts=args.prompt_texts)
        print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s", file=sys.stderr)
        return m

    return eval_cli.run(args, load)


def cmd_serve(args) -> int:
    from v4jax.server import cli as serve_cli

    return serve_cli.run(args, load_model)


def cmd_score(args) -> int:
    from v4jax import scoring
    from v4jax.serving import save_npz_atomic
    from v4jax.sharding import make_mesh

    tokens = load_tokens(args.tokens)  # everything that can be checked before loading the model
    if args.prefill is not None and not 0 < args.prefill <= tokens.shape[1]:
        raise ValueError(f"--prefill must be within 1..{tokens.shape[1]} (the --tokens length), got {args.prefill}")
    check_out(args.out)
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
    try:
        save_npz_atomic(args.out, out)
    except OSError as e:  # a full disk, a file system gone read-only: the atomic write left nothing behind
        raise ValueError(f"--out {args.out}: not written ({e.strerror or e}); a file already there is "
                         "unchanged") from None
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()))
    return 0


def load_tokens(path: str):
    """The --tokens array: a .npy file of integers [B, S] with S >= 1 (ValueError naming the file)."""
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"--tokens {path}: " + ("is a directory, not a .npy file" if os.path.isdir(path)
                                                  else "no such file"))
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        kind = "an .npz archive" if magic.startswith(b"PK") else "not a .npy file (no NumPy header; a text file?)"
        raise ValueError(f"--tokens {path}: {kind}; give one .npy integer array [batch, seq] (numpy.save)")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--tokens {path}: not a readable .npy array ({e})") from None
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"--tokens {path}: needs a 2-D integer array [batch, seq], got {tokens.dtype} "
                         f"{list(tokens.shape)}")
    if tokens.size == 0:
        raise ValueError(f"--tokens {path}: shape {list(tokens.shape)} holds no tokens")
    return tokens


def check_out(path: str) -> None:
    """Refuse an output path that cannot be written, before anything is loaded or computed."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path}: is a directory; give a file name, e.g. {os.path.join(path, 'out.npz')}")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):  # save_npz_atomic creates the missing directories
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise ValueError(f"--out {path}: {d} is a file, not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: the directory {d} is not writable")


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

    for flag, value in (("--batch", args.batch), ("--chunk", args.chunk)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
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
    from v4jax import chat

    if args.mode not in chat.MODES:
        raise ValueError(f"unknown mode '{args.mode}': use one of {', '.join(chat.MODES)}")
    data = read_json(args.messages, "--messages")
    if isinstance(data, dict) and "messages" not in data:
        raise ValueError(f"--messages {args.messages}: an object needs a 'messages' list (or give the list itself)")
    messages, tools = (data["messages"], data.get("tools")) if isinstance(data, dict) else (data, None)
    if args.tools:
        tools = read_json(args.tools, "--tools")
    texts = chat.load_prompt_texts(args.prompt_texts) if args.prompt_texts else None
    try:
        text = chat.render(messages, tools=tools, mode=args.mode, texts=texts)  # checks the messages' shape
    except ValueError as e:
        raise ValueError(f"{args.messages}: {e}") from None
    sys.stdout.write(text)
    return 0


def read_json(path: str, flag: str):
    """The JSON value in the file `path` given as `flag` (ValueError naming it)."""
    import json

    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{flag} {path}: is a directory, not a JSON file") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{flag} {path}: JSON nested too deeply") from None


def check_sampling_args(args) -> None:
    """generate / chat options that need no model, refused before anything is loaded."""
    import math

    for flag, value, ok, want in (
            ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
             "a finite number >= 0 (0 = greedy)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
            ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
            ("--max-context", args.max_context, args.max_context >= 1, ">= 1")):
        if not ok:
            raise ValueError(f"{flag} must be {want}, got {value}")
    if args.speculative and args.temperature != 0:
        raise ValueError(f"--speculative reproduces greedy decoding: use --temperature 0, not {args.temperature}")


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
    check_sampling_args(args)
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
    from v4jax.cli_chat import speed, stream_writer
    from v4jax.serving import generate

    engine, tok, texts, sampling = _session_parts(args)
    if args.mode == "raw":
        text = args.prompt
    else:
        text = chat.render([{"role": "user", "content": args.prompt}], mode=args.mode, texts=texts)
    ids = list(tok.encode(text))
    if args.mode == "raw" and (not ids or ids[0] != engine.cfg.bos_token_id):
        ids = [engine.cfg.bos_token_id] + ids
    if args.profile:
        import jax
        jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    try:
        res = generate(engine, [ids], sampling, tok, stream_writer(sys.stdout), speculative=args.speculative)
    finally:
        if args.profile:
            jax.profiler.stop_trace()
            print(f"[profile written to {args.profile}]", file=sys.stderr)
    g = res["outputs"][0]
    sys.stdout.write("\n")
    print(f"[{len(ids)} prompt tokens, {len(g.tokens)} new ({g.finish}); prefill {res['prefill_s']:.2f}s, "
          f"{speed(res, args.speculative)}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from v4jax import cli_chat

    engine, tok, texts, sampling = _session_parts(args)
    return cli_chat.run(lambda: cli_chat.ReplSession(engine, tok, args.mode, texts, sampling,
                                                     speculative=args.speculative), sampling)


def load_model(path: str, mesh=None, **runtime):
    """A hub-format directory (*.safetensors) or a v4jax training run directory (orbax checkpoints)."""
    from v4jax import checkpoint
    from v4jax.trainer import load_trained

    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"--checkpoint {path}: " + ("a file, not a checkpoint directory"
                                         if os.path.exists(path) else "no such directory"))
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return checkpoint.load_hub(path, mesh=mesh, **runtime)
    runtime.pop("native_weights", None)  # a training run holds its fp32 master weights, nothing quantised
    return load_trained(path, **runtime)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "compile":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is first imported
    from v4jax import compile_cache
    compile_cache.enable()  # on by default: $V4JAX_COMPILE_CACHE (a directory, or "off")
    from v4jax.aot import AOTError
    from v4jax.checkpoint import CheckpointError
    from v4jax.config import ConfigError

    try:
        return {"score": cmd_score, "generate": cmd_generate, "chat": cmd_chat, "kv-report": cmd_kv_report,
                "render": cmd_render, "compile": cmd_compile, "eval": cmd_eval,
                "serve": cmd_serve}[args.cmd](args)
    except (AOTError, CheckpointError, ConfigError, ValueError, OSError) as e:  # OSError: names its file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
