"""Command line: `gptoss convert SRC DST --layout hf|openai [--dequantize]` (also
`python -m gptoss.cli ...`)."""
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
