"""Command line (also `python -m gptoss.cli ...`):

    gptoss convert SRC DST --layout hf|openai [--dequantize]
    gptoss generate CKPT --prompt TEXT      raw text continuation (o200k_harmony, no chat format)
    gptoss chat CKPT [--reasoning low]      a Harmony chat on the terminal (one turn per input line)
    gptoss report [NAME ...] [--context N]  parameters, FLOPs and memory of configurations, as tables
    gptoss study CKPT --prompt TEXT         expert usage and attention-sink mass per layer on a text
    gptoss figures DIR [--checkpoint CKPT --prompt TEXT]   the figures of gptoss.viz as PNG files
"""
import argparse
import sys
from typing import List, Optional

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_state_dict, parse_size, save_checkpoint

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    cfg, sd = load_state_dict(args.src, dtype=dtype, mxfp4="dequantize" if args.dequantize else "keep",
                              progress=not args.quiet)
    files = save_checkpoint(sd, cfg, args.dst, layout=args.layout, max_shard_bytes=max_shard,
                            overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {len(files)} files to {args.dst} ({args.layout} layout)")
    return 0


def _load_model(args: argparse.Namespace):
    import torch

    from .model import Transformer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Transformer.from_checkpoint(args.checkpoint, device=device, dtype=getattr(torch, _DTYPES[args.dtype]),
                                       progress=not args.quiet)


def _load_with_prompt(args: argparse.Namespace):
    """(model, tokenizer, --prompt's token ids) for the commands that run a checkpoint on a text."""
    from .tokenizer import Tokenizer, check_vocab

    tok = Tokenizer()
    ids = tok.encode(args.prompt or "")
    if not ids:
        raise ValueError("--prompt is empty")
    model = _load_model(args)
    check_vocab(model.cfg.vocab_size)
    return model, tok, ids


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    model, tok, prompt = _load_with_prompt(args)
    print(args.prompt, end="", flush=True)
    piece = tok.stream_decoder()  # the continuation is printed as it is generated

    def show(_: int, token: int) -> None:
        if token != tok.endoftext:
            print(piece(token), end="", flush=True)

    generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, seed=args.seed,
             stop_tokens=[tok.endoftext], on_token=show)
    print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .harmony import Chat

    chat = Chat(_load_model(args), reasoning_effort=args.reasoning, developer=args.developer,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        shown = {"channel": None, "final": False}

        def show(channel: Optional[str], text: str) -> None:  # the reply, streamed as it is generated
            if channel == "final" or (args.show_analysis and channel == "analysis"):
                if channel != shown["channel"]:
                    print("" if shown["channel"] is None else "\n", end="")
                    print("[analysis] " if channel == "analysis" else "", end="")
                    shown["channel"] = channel
                shown["final"] |= channel == "final"
                print(text, end="", flush=True)

        reply = chat.send(line.rstrip("\n"), on_delta=show)
        if not shown["final"]:  # no final-channel text streamed (none, or not in the Harmony format)
            print(("\n" if shown["channel"] else "") + reply.final, end="")
        print("" if reply.complete else " [max-new-tokens reached]", flush=True)


def _report(args: argparse.Namespace) -> int:
    from .analysis import named_config, report

    if args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    print(report({name: named_config(name) for name in args.names}, args.context), end="")
    return 0


def _study(args: argparse.Namespace) -> int:
    import torch

    from .analysis import study, study_report

    model, _, ids = _load_with_prompt(args)
    stats = study(model, torch.tensor([ids], device=model.device))
    print(f"{len(ids)} tokens; per layer: the mean attention probability of the sinks (over heads and tokens, "
          f"and of the most sink-bound head), and how the router spread the tokens over the experts\n")
    print(study_report(stats, model.cfg.layer_types), end="")
    return 0


def _figures(args: argparse.Namespace) -> int:
    import torch

    from .viz import save_figures

    model = tokens = None
    if args.checkpoint:
        if not args.prompt:
            raise ValueError("--checkpoint needs --prompt (the text the model is studied on)")
        model, _, ids = _load_with_prompt(args)
        tokens = torch.tensor([ids], device=model.device)
    for path in save_figures(args.out_dir, model, tokens, title=args.checkpoint or ""):
        print(path)
    return 0


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="activations and dense weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (OpenAI or Hugging Face layout)")
    _load_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="GPT-OSS model tools")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint between the OpenAI and Hugging Face layouts",
                          description="Read a gpt-oss checkpoint folder (OpenAI or HF layout; safetensors only) "
                                      "and write it in the chosen layout with a matching config.json.")
    conv.add_argument("src", help="checkpoint folder (config.json + *.safetensors, or a folder with original/)")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--layout", choices=("hf", "openai"), required=True, help="layout to write")
    conv.add_argument("--dequantize", action="store_true",
                      help="write MXFP4 expert weights as dense tensors (bf16 unless --dtype)")
    conv.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating tensors to this dtype")
    conv.add_argument("--max-shard-size", help="largest shard, e.g. 5GB or 4GiB "
                                               "(default: one file for openai, 5GiB for hf)")
    conv.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(func=_convert)
    gen = sub.add_parser("generate", help="continue a text prompt (raw, no chat format)",
                         description="Tokenize the prompt with o200k_harmony, generate over the KV cache until "
                                     "<|endoftext|> or --max-new-tokens, print prompt + continuation.")
    _model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.set_defaults(func=_generate)
    chat = sub.add_parser("chat", help="chat in the Harmony format, one user turn per input line",
                          description="Each line of standard input is a user turn; the assistant's final-channel "
                                      "reply is printed (generation stops on <|return|> or <|call|>).")
    _model_args(chat)
    chat.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium",
                      help="the system message's reasoning effort")
    chat.add_argument("--developer", help="developer instructions (the developer message)")
    chat.add_argument("--show-analysis", action="store_true", help="also print the analysis channel")
    chat.set_defaults(func=_chat)
    rep = sub.add_parser("report", help="parameters, FLOPs and memory of gpt-oss and GPT-2 configurations",
                         description="Markdown tables computed from the configurations (gptoss.analysis): "
                                     "parameters by component, active parameters, forward FLOPs per token, "
                                     "weight, KV-cache and decode bytes.")
    rep.add_argument("names", nargs="*", default=["gpt2-xl", "gpt-oss-20b", "gpt-oss-120b"],
                     help="gpt-oss presets or GPT-2 sizes (default: gpt2-xl gpt-oss-20b gpt-oss-120b)")
    rep.add_argument("--context", type=int, default=4096, help="tokens in context for the per-token figures")
    rep.set_defaults(func=_report)
    st = sub.add_parser("study", help="expert usage and attention-sink mass per layer of a checkpoint on a text",
                        description="Run the model over the prompt and print, per layer, the attention probability "
                                    "its sinks take and how its router spreads the tokens over the experts.")
    _model_args(st)
    st.add_argument("--prompt", required=True)
    st.set_defaults(func=_study)
    fg = sub.add_parser("figures", help="write the figures (attention patterns, parameters, per-token costs; "
                                         "a checkpoint's expert usage and sink mass) as PNG files",
                        description="Figures computed from the code (gptoss.viz).")
    fg.add_argument("out_dir")
    fg.add_argument("--checkpoint", help="also study this checkpoint on --prompt")
    fg.add_argument("--prompt")
    _load_args(fg)
    fg.set_defaults(func=_figures)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"gptoss {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
