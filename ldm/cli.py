"""The `ldm` command: generate images, inspect a checkpoint, encode a prompt, get weights.

    ldm generate "a red circle above a blue square"   text to image, PNGs in --out (default outputs/)
           [--checkpoint PATH] [--steps 25] [--scheduler euler] [--seed N] [--guidance 7.5]
           [--negative TEXT] [--size WxH] [--num-images 1] [--out DIR] [--device D] [--dtype T] [--compile]
           [--lora PATH[:WEIGHT] ...] [--embedding PATH ...] [--clip-skip N] [--prompt-syntax a1111]
           [--prediction-type epsilon|v_prediction|sample]   (default: the checkpoint's)
           (no --checkpoint: $LDM_CHECKPOINT, else a real one in weights/, else the shapes model
           ldm ships, which it names; --size defaults to the model's own: 512x512 SD, 64x64 shapes)
    ldm img2img "a dog" --image IN.png [--strength 0.75] [same options]
    ldm inpaint "a cat" --image IN.png --mask MASK.png [--strength 1.0] [same options]
    ldm download [sd-v1-5|sd-v1-4|sd-v1-5-inpainting|sd-v2-1-base|sd-v2-1] [--dir weights]
                                               (pip install 'ldm[download]'; the entries are the
                                               supported families' (ldm.families))
    ldm info CHECKPOINT                        family, format, dtype, what the UNet predicts and why,
                                               tensors and bytes per stage
    ldm encode "a dog wearing a hat"           tokenize + CLIP-encode, print the ids and the context
           [--checkpoint PATH]                 (default: as for generate)
    ldm train [--out runs/shapes] [--resume] [--stage vae|unet|all] [--set KEY=VALUE ...]
                                               train the shipped shapes model (ldm/train.py)
    ldm random-checkpoint PATH                 a family's single-file layout, random weights
           [--size tiny|full] [--dtype fp32|fp16] [--seed N] [--inpainting] [--family sd1|sd2|sd2-v|...]

Every failure prints one line, `ldm: error: ...`, and exits with status 1 (2 for bad usage, 130
when interrupted); `ldm --debug ...` or LDM_DEBUG=1 shows the traceback of an unexpected one.
Before any sampling the command checks the device, that --out can be written, and that the
requested images fit in memory (ldm.memory), so a run that cannot finish fails in seconds with
the limit, not minutes later with a crash. Nothing on disk is ever overwritten: images get the
next free number in the output folder, with the generation parameters in the PNG's "parameters"
text chunk.
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

from ldm import families, memory
from ldm.commandline import ArgumentParser

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CLIError(Exception):
    """A failure to report in one line."""


def find_checkpoint(given: str | None) -> Path:
    """--checkpoint, else ldm.weights.default_checkpoint(): $LDM_CHECKPOINT, a real checkpoint in
    ./weights/, else ldm's shipped shapes model, which it names in one line (it is not SD)."""
    from ldm.weights import SHIPPED, default_checkpoint

    if given:
        return Path(given)
    path, why = default_checkpoint("weights")
    if path == SHIPPED:
        print(f"using {why}")
    return path


def cmd_info(args) -> None:
    from ldm import checkpoint

    ck = checkpoint.read(args.checkpoint)
    s = ck.summary()
    print(f"{ck.path}")
    print(f"  family  {s['family']}   format {s['format']}   dtype {s['dtype']}")
    print(f"  predicts {s['prediction_type']} ({s['prediction_reason']})")
    for stage, st in s["stages"].items():
        print(f"  {stage:<13} {st['tensors']:>5} tensors  {st['bytes'] / 2**20:>9.1f} MiB")
    for what, count in s["ignored"].items():
        print(f"  ignored       {count:>5} x {what}")


def cmd_encode(args) -> None:
    from ldm import checkpoint, weights

    path = find_checkpoint(args.checkpoint)
    ck = checkpoint.read(path)
    text_encoder, _, _ = weights.build(ck, dtype=torch.float32)
    tok = ck.record.tokenizer()  # the family's
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


def cmd_train(args) -> None:
    from ldm import train

    try:
        train.main(args.train_args)
    except SystemExit as e:  # train's own usage errors: SystemExit("ldm train: ...") or argparse's 2
        if isinstance(e.code, str):
            raise CLIError(e.code.removeprefix("ldm train: ")) from None
        if e.code not in (0, None):
            raise


def cmd_random_checkpoint(args) -> None:
    from ldm import weights

    parent = Path(args.path).parent  # checked before seconds of random weights
    _writable_folder(parent, f"{args.path}: its folder {parent}")
    if args.inpainting and args.family not in (None, "sd1-inpaint"):  # in the CLI's own words
        raise CLIError(f"--inpainting is the sd1-inpaint family; it does not go with --family {args.family}")
    family = weights.random_family(args.family, args.inpainting)
    path = weights.random_checkpoint(args.path, size=args.size, dtype=DTYPES[args.dtype],
                                     seed=args.seed, family=family.name)
    print(f"wrote {path} ({args.size}, {args.dtype}, {path.stat().st_size / 2**20:.1f} MiB): "
          f"random weights in the {family.title} single-file layout; its images are noise")


def _is_the_command() -> bool:
    """Is this process the `ldm` command (its console script, or python -m ldm.cli), not a caller's?"""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name == "ldm.cli") or Path(sys.argv[0]).name == "ldm"


def cmd_explore(args) -> None:
    """`ldm explore`: listen first (a taken port fails before the model loads), then load, then serve."""
    import ldm
    from ldm.explore import bind

    server = bind(args.host, args.port, allow_remote=args.allow_remote)
    try:
        server.attach(ldm.load(find_checkpoint(args.checkpoint)))
        print(f"ldm explore: open {server.url} in a browser (Ctrl-C stops the server)", flush=True)
        server.serve()
    except KeyboardInterrupt:
        server.server_close()
        print("ldm explore: stopped", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # As the `ldm` command, end the process here: after a Ctrl-C the interpreter's own shutdown
        # sometimes aborted ("terminate called without an active exception", exit -6: 1 of 25 and 2 of 40
        # stops on a Zen 4 CPU), a native thread torn down after the server's threads, and nothing is left
        # to clean up. Called from someone's interpreter (a notebook, a test), return to it instead.
        if _is_the_command():
            os._exit(0)
    finally:
        server.server_close()


# ---- generation ----------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    """'512x768' -> (width 512, height 768)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like WIDTHxHEIGHT in positive pixels, "
                                         f"e.g. 512x512")
    return w, h


def _crop(text: str) -> tuple[int, int]:
    """'32,0' -> (top 32, left 0)."""
    try:
        top, left = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"crop {text!r} must look like TOP,LEFT in pixels, e.g. 0,0") from None
    return top, left


def _writable_folder(folder: str | Path, what: str) -> Path:  # what: "--out outputs", for the error
    """Create the folder if needed and prove we can write there, before minutes of work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason += ": a file is in the way of the folder"
        raise CLIError(f"{what}: cannot write there ({reason})") from None
    return folder


def _open_image(path: str, what: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except OSError as e:  # missing file, not an image (PIL's UnidentifiedImageError is an OSError)
        raise CLIError(f"{what} {path}: cannot read it as an image ({e})") from None
    except Image.DecompressionBombError as e:  # PIL refuses images of more than 2 x 89M pixels
        raise CLIError(f"{what} {path}: {e}") from None


# ---- the device (ldm.memory checks that this machine has it, and that the run fits) ---------------
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _device(text: str) -> torch.device:
    """--device: 'cpu', 'cuda', 'cuda:N' or 'mps' (argparse type: a bad one is a usage error)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"device {text!r} is not one of cpu, cuda, cuda:N (N = 0, 1, ...), mps")
    return device


def cmd_generate(args) -> None:
    import ldm
    from ldm import images, lora

    folder = _writable_folder(args.out, f"--out {args.out}")
    device = memory.check_device(args.device)
    path = find_checkpoint(args.checkpoint)
    image = mask = None
    if args.command != "generate":  # read the images before loading the model: a bad file fails at once
        image = _open_image(args.image, "--image")
        if args.command == "inpaint":
            mask = _open_image(args.mask, "--mask")
    dtype = DTYPES.get(args.dtype, args.dtype)  # None, a torch dtype, or "auto"
    loras = [lora.parse_spec(spec) for spec in args.lora]  # a bad weight fails before the model loads
    for flag, files in (("--lora", [file for file, _ in loras]), ("--embedding", args.embedding)):
        for file in files:
            if not Path(file).is_file():
                raise CLIError(f"{flag} {file}: no such file")
    pipe = ldm.load(path, device=device, dtype=dtype, prediction_type=args.prediction_type, compile=args.compile)
    for file, weight in loras:
        pipe.load_lora(file, weight)
    for file in args.embedding:
        emb = pipe.load_embedding(file)
        logging.getLogger("ldm").info("embedding %s: the prompt word %r (%d vectors)", file, emb.name, len(emb.ids))
    tile = {"auto": None, "on": True, "off": False}[args.tile]
    kw = dict(steps=args.steps, scheduler=args.scheduler, guidance=args.guidance, seed=args.seed,
              negative_prompt=args.negative, num_images=args.num_images, progress=not args.quiet, tile=tile,
              clip_skip=args.clip_skip, prompt_syntax=args.prompt_syntax, crops_coords_top_left=args.crop,
              original_size=args.original_size and args.original_size[::-1],  # WxH -> (h, w)
              target_size=args.target_size and args.target_size[::-1])
    if args.size:
        (width, height), size_arg = args.size, f"--size {args.size[0]}x{args.size[1]}"
    elif image is None:  # txt2img: the size the model was trained at
        width = height = pipe.default_size
        size_arg = f"the model's default size {width}x{height}"
    else:
        (width, height), size_arg = image.size, f"--image {args.image} ({image.width}x{image.height})"
    if args.num_images >= 1 and args.steps >= 1 and width > 0 and height > 0:  # else the pipeline's error below
        memory.check_fits(pipe, height, width, args.num_images, size_arg, steps=args.steps, guidance=args.guidance,
                   tile=tile, encode=image is not None)
    if not args.size:
        width = height = None  # the pipeline keeps the image's size
    with warnings.catch_warnings(record=True) as caught:  # a truncated prompt: one line, not a traceback
        warnings.simplefilter("always")
        if args.command == "generate":
            result = pipe.generate(args.prompt, height=height, width=width, **kw)
        elif args.command == "img2img":
            result = pipe.img2img(args.prompt, image, strength=args.strength, height=height, width=width, **kw)
        else:
            result = pipe.inpaint(args.prompt, image, mask, strength=args.strength, height=height,
                                  width=width, **kw)
    said = set()  # each once; not the libraries' deprecation notes about their own internals (torch.compile's)
    for w in caught:
        text = " ".join(str(w.message).split())
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) \
                and text not in said:
            said.add(text)
            print(f"ldm: warning: {text}", file=sys.stderr)
    for img, seed, params in zip(result.images, result.seeds, result.parameters):
        saved = images.save_png(img, folder, params, stem=str(seed))
        print(f"wrote {saved} ({img.width}x{img.height}, seed {seed})")


# ---- download --------------------------------------------------------------------------------------
# name -> ldm.families.Download (Hub repository, file, size, sha256), the supported families' entries.
# Licence: the entry's (CreativeML OpenRAIL-M for SD 1.x: accept it on the model page first; a gated
# repository also needs `huggingface-cli login`).
def _downloads() -> dict:
    return {name: entry for name, (_, entry) in families.downloads().items()}


DOWNLOADS = _downloads()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def cmd_download(args) -> None:
    entry = DOWNLOADS[args.name]
    repo, filename, sha256 = entry.repo, entry.filename, entry.sha256
    target = Path(args.dir) / filename
    if target.exists():
        raise CLIError(f"{target} already exists; not overwritten (delete it to download again)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CLIError("`ldm download` needs huggingface_hub: pip install 'ldm[download]' "
                       "(or download the file by hand: weights/README.md)") from None
    _writable_folder(args.dir, f"--dir {args.dir}")
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=args.dir))  # same disk: the final move is a rename
    try:
        print(f"downloading {repo}/{filename} ({entry.size / 1e9:.2f} GB, licence {entry.licence}) ...",
              file=sys.stderr)
        got = Path(hf_hub_download(repo, filename, local_dir=staging))  # its own progress bar
        digest = sha256_of(got)
        if digest != sha256:
            raise CLIError(f"{filename}: sha256 {digest} is not the expected {sha256}; the download is "
                           f"corrupt or the file changed upstream; nothing was kept")
        try:
            os.link(got, target)  # exclusive: a target that appeared while we downloaded is never replaced
        except FileExistsError:
            raise CLIError(f"{target} already exists; not overwritten") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {target} (sha256 checked)")


def _add_generation_options(s, size_default: str):
    from ldm.samplers import PREDICTION_TYPES, SAMPLERS

    s.add_argument("prompt")
    s.add_argument("--checkpoint", help="default: $LDM_CHECKPOINT, else the first real one in weights/, "
                   "else the shipped shapes model")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--scheduler", choices=SAMPLERS, default="euler")
    s.add_argument("--seed", type=int, default=None, help="image i gets seed + i (default: random)")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1: none)")
    s.add_argument("--negative", default=None, help="negative prompt (default: none; SDXL then uses zeros)")
    s.add_argument("--size", type=_size, default=None,
                   help="WIDTHxHEIGHT in pixels (default: " + ("the size the model was trained at: 512x512 "
                        "for SD 1.x, 64x64 for the shipped model)" if size_default == "model"
                        else "the image's; resizes it)"))
    s.add_argument("--original-size", type=_size, default=None, metavar="WIDTHxHEIGHT",
                   help="SDXL's size conditioning: the size the image 'had before resizing' (default: --size)")
    s.add_argument("--target-size", type=_size, default=None, metavar="WIDTHxHEIGHT",
                   help="SDXL's size conditioning: the size asked for (default: --size)")
    s.add_argument("--crop", type=_crop, default=(0, 0), metavar="TOP,LEFT",
                   help="SDXL's size conditioning: where a training crop 'cut' the image (default: 0,0)")
    s.add_argument("--num-images", type=int, default=1, help="images per prompt")
    s.add_argument("--out", default="outputs", help="output folder (created; files never overwritten)")
    s.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:1 ..., mps (default: cuda if present)")
    s.add_argument("--dtype", choices=(*DTYPES, "auto"), default=None,
                   help="default: fp16 on CUDA, fp32 on CPU; auto: fp16 on CUDA (VAE fp32), bf16 on a CPU with "
                        "native bf16, else fp32")
    s.add_argument("--compile", action="store_true",
                   help="run the UNet through torch.compile: faster steps after a first one that compiles for "
                        "minutes (pays off for many images at one size; needs a C++ compiler on the CPU)")
    s.add_argument("--tile", choices=("auto", "on", "off"), default="auto",
                   help="tiled VAE decode (auto: above 512x512)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="apply a LoRA file (kohya/A1111, diffusers/peft), weight default 1.0; repeatable")
    s.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="add a textual-inversion embedding; its word is the file's name; repeatable")
    s.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="A1111's count: 1 = the text encoder's last layer (SD 1.x), 2 = the one before")
    s.add_argument("--prompt-syntax", choices=("plain", "a1111"), default="plain",
                   help="a1111: (word:1.3) weights, [word], BREAK and prompts past 75 tokens; "
                        "plain: the prompt as text, cut at 75 tokens (as diffusers)")
    s.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the UNet predicts (default: the checkpoint's, see `ldm info`); an override "
                        "must be one its family allows (SD 2.x: epsilon or v_prediction)")
    s.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ldm", description="A readable Stable Diffusion 1.x.")
    # -v and --debug go before or after the subcommand; SUPPRESS keeps a subcommand's absent flag
    # from overwriting the one given before it
    common = ArgumentParser(add_help=False)
    for parser, default in ((p, False), (common, argparse.SUPPRESS)):
        parser.add_argument("-v", "--verbose", action="store_true", default=default,
                            help="log what each stage does")
        parser.add_argument("--debug", action="store_true", default=default,
                            help="show the traceback of an unexpected error (or set LDM_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, parents=[common])

    s = command("generate", "text to image")
    _add_generation_options(s, "model")
    s = command("img2img", "image to image")
    _add_generation_options(s, "image")
    s.add_argument("--image", required=True, help="the starting image (PNG, JPEG, ...)")
    s.add_argument("--strength", type=float, default=0.75, help="0: keep the image ... 1: redraw it all")
    s = command("inpaint", "repaint the white part of a mask")
    _add_generation_options(s, "image")
    s.add_argument("--image", required=True, help="the image to repaint")
    s.add_argument("--mask", required=True, help="same size as the image; white = repaint, black = keep")
    s.add_argument("--strength", type=float, default=1.0)

    s = command("download", "download a checkpoint of a supported family into weights/ (needs huggingface_hub)")
    s.add_argument("name", nargs="?", choices=tuple(DOWNLOADS), default="sd-v1-5")
    s.add_argument("--dir", default="weights")
    s.set_defaults(func=cmd_download)

    s = command("info", "what a checkpoint holds")
    s.add_argument("checkpoint", help=".safetensors / .ckpt file or diffusers folder")
    s.set_defaults(func=cmd_info)

    s = command("encode", "tokenize and encode a prompt; print the tensors")
    s.add_argument("prompt")
    s.add_argument("--checkpoint", help="default: $LDM_CHECKPOINT, else the first real one in weights/, "
                   "else the shipped shapes model")
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("train", add_help=False, prefix_chars="\0",  # every argument, --help too, is ldm.train's
                       help="train ldm's shapes model (ldm/train.py; `ldm train --help` lists its options)")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="passed to ldm.train.main")
    s.set_defaults(func=cmd_train)

    s = command("random-checkpoint", "write a random-weight checkpoint of a supported family")
    s.add_argument("path", help="where to write it (.safetensors or .ckpt); never overwritten")
    s.add_argument("--size", choices=("tiny", "full"), default="tiny")
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--inpainting", action="store_true", help="9-channel UNet input (SD 1.5 inpainting)")
    s.add_argument("--family", choices=tuple(f.name for f in families.supported()), default=None,
                   help="its family's layout and shapes (default: sd1; sd2 and sd2-v: SD 2.x)")
    s.set_defaults(func=cmd_random_checkpoint)

    s = command("explore", "a live page of every stage (tokens, context, steps, attention) on 127.0.0.1")
    s.add_argument("--checkpoint", help="default: as for generate (the shipped shapes model if no other)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host other machines can reach "
                   "(the page has no login: anyone who reaches it can run the model)")
    s.set_defaults(func=cmd_explore)
    return p


def one_line(e: BaseException) -> str:
    """The `ldm: error: ...` line for an exception: ours and the library's whole (they are written
    as one sentence), anything else its type and first line, with how to see more."""
    if isinstance(e, (CLIError, ValueError, OSError, FloatingPointError)):  # CheckpointError is a
        return f"ldm: error: {' '.join(str(e).split())}"  # ValueError; NonFiniteError a FloatingPointError
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in first:
        return (f"ldm: error: out of memory ({first or type(e).__name__}); "
                f"try a smaller --size, fewer --num-images or --tile on")
    return (f"ldm: error: {type(e).__name__}: {first or 'no message'} "
            f"(`ldm --debug ...` or LDM_DEBUG=1 shows the traceback)")


def main(argv: list[str] | None = None) -> int:
    """Run the `ldm` command; returns its exit status (0 ok, 1 failure, 2 bad usage, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed on one line
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    debug = args.debug or os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("ldm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(one_line(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
