"""The `ldm` command: inspect a checkpoint, encode a prompt, make a random-weight checkpoint.

    ldm info CHECKPOINT                        family, format, dtype, tensors and bytes per stage
    ldm encode "a dog wearing a hat"           tokenize + CLIP-encode, print the ids and the context
           [--checkpoint PATH]                 (default: $LDM_CHECKPOINT, else the first one in weights/)
    ldm random-checkpoint PATH                 SD 1.x single-file layout, random weights
           [--size tiny|full] [--dtype fp32|fp16] [--seed N] [--inpainting]

Every failure prints one line, `ldm: error: ...`, and exits with status 1 (2 for bad usage).
Nothing on disk is ever overwritten.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HOW_TO_GET_WEIGHTS = (
    "put an SD 1.x checkpoint (.safetensors, .ckpt or a diffusers folder) in weights/ "
    "(weights/README.md says where to get one) or pass --checkpoint PATH; without real weights, "
    "`ldm random-checkpoint weights/random-tiny.safetensors` makes a random one to try things")


class CLIError(Exception):
    """A failure to report in one line."""


def find_checkpoint(given: str | None) -> Path:
    """--checkpoint, else $LDM_CHECKPOINT, else the first checkpoint in ./weights/."""
    if given:
        return Path(given)
    if os.environ.get("LDM_CHECKPOINT"):
        return Path(os.environ["LDM_CHECKPOINT"])
    for p in sorted(Path("weights").glob("*")):
        if p.suffix in (".safetensors", ".ckpt") or (p / "model_index.json").is_file():
            return p
    raise CLIError(f"no checkpoint given and none found in {Path('weights').resolve()}: "
                   + HOW_TO_GET_WEIGHTS)


def cmd_info(args) -> None:
    from ldm import checkpoint

    ck = checkpoint.read(args.checkpoint)
    s = ck.summary()
    print(f"{ck.path}")
    print(f"  family  {s['family']}   format {s['format']}   dtype {s['dtype']}")
    for stage, st in s["stages"].items():
        print(f"  {stage:<13} {st['tensors']:>5} tensors  {st['bytes'] / 2**20:>9.1f} MiB")
    for what, count in s["ignored"].items():
        print(f"  ignored       {count:>5} x {what}")


def cmd_encode(args) -> None:
    from ldm import checkpoint, weights
    from ldm.tokenizer import CLIPTokenizer

    path = find_checkpoint(args.checkpoint)
    ck = checkpoint.read(path)
    text_encoder, _, _ = weights.build(ck, dtype=torch.float32)
    tok = CLIPTokenizer()
    ids = tok([args.prompt])  # (1, 77)
    n = min(len(tok.encode(args.prompt)), 75) + 2  # BOS + tokens + EOS
    with torch.no_grad():
        context = text_encoder(ids)  # (1, 77, C)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
    print(f"checkpoint {path} ({ck.family}, {ck.format}, {ck.dtype})")
    print(f"prompt     {args.prompt!r}")
    print(f"tokens     {['<bos>'] + tok.tokenize(args.prompt)[:75] + ['<eos>']}")
    print(f"ids        {tuple(ids.shape)} {ids.dtype}: {ids[0, :n].tolist()} + "
          f"{77 - n} x {tok.pad_id} (padding)")
    print(f"context    {tuple(context.shape)} {context.dtype}: mean {context.mean():.4f}, "
          f"std {context.std():.4f}")
    print(f"context[0, :{min(n, 4)}, :6] =")
    print(context[0, :min(n, 4), :6])


def cmd_random_checkpoint(args) -> None:
    from ldm import weights

    path = weights.random_checkpoint(args.path, size=args.size, dtype=DTYPES[args.dtype],
                                     seed=args.seed, inpainting=args.inpainting)
    print(f"wrote {path} ({args.size}, {args.dtype}, {path.stat().st_size / 2**20:.1f} MiB): "
          f"random weights in the SD 1.x single-file layout; its images are noise")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm", description="A readable Stable Diffusion 1.x.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="what a checkpoint holds")
    s.add_argument("checkpoint", help=".safetensors / .ckpt file or diffusers folder")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("encode", help="tokenize and encode a prompt; print the tensors")
    s.add_argument("prompt")
    s.add_argument("--checkpoint", help="default: $LDM_CHECKPOINT, else the first one in weights/")
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("random-checkpoint", help="write a random-weight SD 1.x checkpoint")
    s.add_argument("path", help="where to write it (.safetensors or .ckpt); never overwritten")
    s.add_argument("--size", choices=("tiny", "full"), default="tiny")
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--inpainting", action="store_true", help="9-channel UNet input (SD 1.5 inpainting)")
    s.set_defaults(func=cmd_random_checkpoint)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        args.func(args)
    except (CLIError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"ldm: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 1
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
