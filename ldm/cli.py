"""The `ldm` command: generate images, inspect a checkpoint, encode a prompt, get weights.

    ldm generate "a dog wearing a hat"         text to image, PNGs in --out (default outputs/)
           [--checkpoint PATH] [--steps 25] [--scheduler euler] [--seed N] [--guidance 7.5]
           [--negative TEXT] [--size 512x512] [--num-images 1] [--out DIR] [--device D] [--dtype T]
    ldm img2img "a dog" --image IN.png [--strength 0.75] [same options]
    ldm inpaint "a cat" --image IN.png --mask MASK.png [--strength 1.0] [same options]
    ldm download [sd-v1-5|sd-v1-5-inpainting|sd-v1-4] [--dir weights]   (pip install 'ldm[download]')
    ldm info CHECKPOINT                        family, format, dtype, tensors and bytes per stage
    ldm encode "a dog wearing a hat"           tokenize + CLIP-encode, print the ids and the context
           [--checkpoint PATH]                 (default: $LDM_CHECKPOINT, else the first one in weights/)
    ldm random-checkpoint PATH                 SD 1.x single-file layout, random weights
           [--size tiny|full] [--dtype fp32|fp16] [--seed N] [--inpainting]

Every failure prints one line, `ldm: error: ...`, and exits with status 1 (2 for bad usage).
Nothing on disk is ever overwritten: images get the next free number in the output folder, with
the generation parameters in the PNG's "parameters" text chunk.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
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
    from ldm.weights import find_checkpoint as find

    found = Path(given) if given else find("weights")
    if found is None:
        raise CLIError(f"no checkpoint given and none found in {Path('weights').resolve()}: "
                       + HOW_TO_GET_WEIGHTS)
    return found


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


# ---- generation ----------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    """'512x768' -> (width 512, height 768)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


def _writable_folder(out: str) -> Path:
    """Create --out if needed and prove we can write there, before minutes of sampling."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return folder


def _open_image(path: str, what: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except OSError as e:  # missing file, not an image (PIL's UnidentifiedImageError is an OSError)
        raise CLIError(f"{what} {path}: cannot read it as an image ({e})") from None


def cmd_generate(args) -> None:
    import ldm
    from ldm import images

    folder = _writable_folder(args.out)
    path = find_checkpoint(args.checkpoint)
    dtype = DTYPES[args.dtype] if args.dtype else None
    pipe = ldm.load(path, device=args.device, dtype=dtype)
    kw = dict(steps=args.steps, scheduler=args.scheduler, guidance=args.guidance, seed=args.seed,
              negative_prompt=args.negative, num_images=args.num_images, progress=not args.quiet,
              tile={"auto": None, "on": True, "off": False}[args.tile])
    with warnings.catch_warnings(record=True) as caught:  # a truncated prompt: one line, not a traceback
        warnings.simplefilter("always")
        if args.command == "generate":
            width, height = args.size
            result = pipe.generate(args.prompt, height=height, width=width, **kw)
        else:
            image = _open_image(args.image, "--image")
            width, height = args.size if args.size else (None, None)
            if args.command == "img2img":
                result = pipe.img2img(args.prompt, image, strength=args.strength, height=height, width=width, **kw)
            else:
                mask = _open_image(args.mask, "--mask")
                result = pipe.inpaint(args.prompt, image, mask, strength=args.strength, height=height,
                                      width=width, **kw)
    for w in caught:
        print(f"ldm: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    for img, seed, params in zip(result.images, result.seeds, result.parameters):
        saved = images.save_png(img, folder, params, stem=str(seed))
        print(f"wrote {saved} ({img.width}x{img.height}, seed {seed})")


# ---- download --------------------------------------------------------------------------------------
# name -> (Hub repository, file, sha256 of the file). Licence: CreativeML OpenRAIL-M (accept it on the
# model page first; a gated repository also needs `huggingface-cli login`).
DOWNLOADS = {
    "sd-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
                "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
    "sd-v1-5-inpainting": ("stable-diffusion-v1-5/stable-diffusion-inpainting", "sd-v1-5-inpainting.ckpt",
                           "c6bbc15e3224e6973459ba78de4998b80b50112b0ae5b5c67113d56b4e366b19"),
    "sd-v1-4": ("CompVis/stable-diffusion-v-1-4-original", "sd-v1-4.ckpt",
                "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556"),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def cmd_download(args) -> None:
    repo, filename, sha256 = DOWNLOADS[args.name]
    target = Path(args.dir) / filename
    if target.exists():
        raise CLIError(f"{target} already exists; not overwritten (delete it to download again)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CLIError("`ldm download` needs huggingface_hub: pip install 'ldm[download]' "
                       "(or download the file by hand: weights/README.md)") from None
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=args.dir))  # same disk: the final move is a rename
    try:
        print(f"downloading {repo}/{filename} (about 4 GB) ...", file=sys.stderr)
        got = Path(hf_hub_download(repo, filename, local_dir=staging))  # its own progress bar
        digest = sha256_of(got)
        if digest != sha256:
            raise CLIError(f"{filename}: sha256 {digest} is not the expected {sha256}; the download is "
                           f"corrupt or the file changed upstream; nothing was kept")
        if target.exists():  # appeared while we downloaded
            raise CLIError(f"{target} already exists; not overwritten")
        os.replace(got, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {target} (sha256 checked)")


def _add_generation_options(s, size_default):
    from ldm.samplers import SAMPLERS

    s.add_argument("prompt")
    s.add_argument("--checkpoint", help="default: $LDM_CHECKPOINT, else the first one in weights/")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--scheduler", choices=SAMPLERS, default="euler")
    s.add_argument("--seed", type=int, default=None, help="image i gets seed + i (default: random)")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1: none)")
    s.add_argument("--negative", default="", help="negative prompt")
    s.add_argument("--size", type=_size, default=size_default,
                   help="WIDTHxHEIGHT in pixels" + ("" if size_default else " (default: the image's; resizes it)"))
    s.add_argument("--num-images", type=int, default=1, help="images per prompt")
    s.add_argument("--out", default="outputs", help="output folder (created; files never overwritten)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    s.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    s.add_argument("--tile", choices=("auto", "on", "off"), default="auto",
                   help="tiled VAE decode (auto: above 512x512)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm", description="A readable Stable Diffusion 1.x.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("generate", help="text to image")
    _add_generation_options(s, (512, 512))
    s = sub.add_parser("img2img", help="image to image")
    _add_generation_options(s, None)
    s.add_argument("--image", required=True, help="the starting image (PNG, JPEG, ...)")
    s.add_argument("--strength", type=float, default=0.75, help="0: keep the image ... 1: redraw it all")
    s = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_options(s, None)
    s.add_argument("--image", required=True, help="the image to repaint")
    s.add_argument("--mask", required=True, help="same size as the image; white = repaint, black = keep")
    s.add_argument("--strength", type=float, default=1.0)

    s = sub.add_parser("download", help="download an SD 1.x checkpoint into weights/ (needs huggingface_hub)")
    s.add_argument("name", nargs="?", choices=tuple(DOWNLOADS), default="sd-v1-5")
    s.add_argument("--dir", default="weights")
    s.set_defaults(func=cmd_download)

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
    except (CLIError, ValueError, OSError, FloatingPointError) as e:  # CheckpointError is a ValueError;
        # NonFiniteError (NaN/inf images) a FloatingPointError
        print(f"ldm: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 1
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
