"""Which family a checkpoint is, read from its keys and shapes against the records in ldm.families.

The rule, in order (each refusal is one line naming what the file looks like):

1. Other kinds of files are named: textual-inversion embeddings, LoRAs, a VAE or one
   diffusers component on its own, anything without a UNet (`other_kind`).
2. The layout: of the family layouts whose every stage prefix the keys carry, the one with the most
   stages, else the first whose text-encoder prefix they carry (cond_stage_model.transformer.* is
   SD 1.x's, cond_stage_model.model.* SD 2.x's, conditioner.embedders.{0.transformer,1.model}.* SDXL
   base's); a layout whose families are all slots (ldm.families: configs None; the SDXL refiner's
   conditioner.embedders.0.model.*) is refused by name. `split` cuts the keys
   into one state dict per stage with that layout's prefixes.
3. The family: the UNet's traits, `input_blocks.0.0.weight.shape[1]` (4 channels; 9 for inpainting:
   latent + mask + masked-image latent) and whether its transformers' proj_in is linear (SD 2.x) or
   a 1x1 convolution (SD 1.x), must be those of a family of that layout (`family_of`).
   Families with the same traits differ only in what they predict (SD 2.x 512-base epsilon, 768-v v):
   the tensors cannot tell them apart (`twins`), so what the file says decides, else one run of the
   UNet: the rule is in ldm/checkpoint/prediction.py; the user overrides it (ldm.load(..., prediction_type=...)).
"""
from __future__ import annotations

from collections import Counter

from torch import Tensor

from ldm import families
from ldm.checkpoint.errors import CheckpointError, supported_text, unsupported
from ldm.clip import CLIPTextModel
from ldm.families import Family

__all__ = ["other_kind", "layout_of", "split", "family_of", "twins", "traits", "text_encoder_keys"]


def other_kind(where, raw: dict) -> None:
    """Raise a CheckpointError naming what `raw` is when it is not a whole checkpoint of a family."""
    keys = [k for k in raw if isinstance(k, str)]
    has = lambda *marks: any(m in k for k in keys for m in marks)
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
    if "string_to_param" in raw or "emb_params" in raw:
        raise unsupported(where, "a textual-inversion embedding (string_to_param / emb_params)")
    if starts("lora_unet_", "lora_te") or has(".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down."):
        raise unsupported(where, "a LoRA (low-rank adapter weights)")
    if starts(*{f.prefixes["unet"] for f in families.FAMILIES.values()}):
        return
    tensors = [v for v in raw.values() if isinstance(v, Tensor)]
    if starts("encoder.", "decoder.", "quant_conv.", "post_quant_conv."):
        raise unsupported(where, "a VAE-only file (encoder.*, decoder.*, quant_conv at the top level)")
    if starts("down_blocks.", "conv_in.", "text_model.", "embeddings.", "encoder.layers."):
        raise unsupported(where, "one component in the diffusers layout; read() its whole diffusers folder")
    if 0 < len(tensors) <= 4 and all(t.ndim <= 2 and t.numel() <= 100 * 1024 for t in tensors):
        raise unsupported(where, f"a textual-inversion embedding ({len(tensors)} small tensor(s))")
    raise CheckpointError(f"{where}: not a Stable Diffusion checkpoint: no model.diffusion_model.* keys "
                          f"({len(tensors)} tensors, e.g. {keys[:4]}). {supported_text()}.")


def layout_of(where, keys) -> list[Family]:
    """The families sharing the layout (prefixes) the keys use: of the layouts whose every stage prefix
    appears, the one with the most stages (a family with a fourth stage over SD 1.x's three); else the
    first whose text-encoder prefix appears; else SD 1.x's (whose split then says what is missing).
    A layout of slots is refused."""
    keys = [k for k in keys if isinstance(k, str)]
    layouts: dict[tuple, list[Family]] = {}
    for fam in families.FAMILIES.values():
        layouts.setdefault(tuple(sorted(fam.prefixes.items())), []).append(fam)
    present = {p for fams in layouts.values() for p in fams[0].prefixes.values() if any(k.startswith(p) for k in keys)}
    whole = [fams for fams in layouts.values() if set(fams[0].prefixes.values()) <= present]
    text = lambda fams: fams[0].prefixes.get("text_encoder")
    chosen = (max(whole, key=lambda fams: len(fams[0].stages)) if whole else
              next((fams for fams in layouts.values() if text(fams) in present), next(iter(layouts.values()))))
    if not any(f.supported for f in chosen):
        raise unsupported(where, chosen[0].looks_like)
    return chosen


def text_encoder_keys(sd: dict[str, Tensor], ignored: Counter) -> dict[str, Tensor]:
    """CLIP's keys (Hugging Face naming) as our CLIPTextModel names them, from either transformers layout
    (transformers 5 saves them without text_model.); the position_ids buffer (0..76) is dropped."""
    out = {}
    for k, t in sd.items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        if k == "text_model.embeddings.position_ids":   # our CLIP computes positions
            ignored["position_ids"] += 1
            continue
        out[k] = t
    return out


def split(where, raw: dict, layout: Family, ema: bool) -> tuple[dict[str, dict[str, Tensor]], Counter]:
    """A CompVis single file -> {stage: state dict} with `layout`'s prefixes stripped, plus counts of
    what was left out (the EMA copy, schedule buffers, ...)."""
    prefixes = layout.prefixes
    stages: dict[str, dict[str, Tensor]] = {s: {} for s in layout.stage_names}
    ignored: Counter = Counter()
    for key, t in raw.items():
        if not (isinstance(key, str) and isinstance(t, Tensor)):
            ignored["non-tensor entries"] += 1
            continue
        stage = next((s for s, p in prefixes.items() if key.startswith(p)), None)
        if stage is not None:
            stages[stage][key[len(prefixes[stage]):]] = t
        elif key.startswith("model_ema."):
            # Non-pruned files keep an EMA copy of the UNet, named with the dots removed
            # (model_ema.diffusion_modelinput_blocks00weight). Like diffusers' single-file
            # loader by default (convert_ldm_unet_checkpoint(extract_ema=False)) we use the
            # non-EMA weights and ignore these, unless read(..., ema=True) asks for them.
            ignored["model_ema"] += 1
        else:
            ignored["other top-level (schedule buffers, ...)"] += 1
    if ema:
        for key in list(stages["unet"]):
            flat = "model_ema.diffusion_model" + key.replace(".", "")
            if not isinstance(raw.get(flat), Tensor):
                raise CheckpointError(f"{where}: ema=True but the file has no EMA copy of {key} ({flat})")
            stages["unet"][key] = raw[flat]
    for stage in layout.stages:  # transformers' CLIP naming (SD 1.x's text tower): one layout of its keys
        if stage.model is CLIPTextModel:
            stages[stage.name] = text_encoder_keys(stages[stage.name], ignored)
    for stage, sd in stages.items():
        if not sd:
            raise CheckpointError(f"{where}: no {prefixes[stage]}* tensors ({stage} missing); {supported_text()}.")
    return stages, ignored


def traits(where, stages: dict[str, dict[str, Tensor]], layout: Family) -> tuple[int, bool]:
    """(the UNet's input channels, whether its proj_in is linear), after checking the tensors detection reads."""
    unet = stages["unet"]
    if "input_blocks.0.0.weight" not in unet:
        raise CheckpointError(f"{where}: the UNet has no input_blocks.0.0.weight; not an SD UNet. {supported_text()}.")
    text = [(key, stages.get(stage, {}), 2) for stage, key in layout.text_width_keys.items()]
    for key, sd, ndim in (("input_blocks.0.0.weight", unet, 4), *text,
                          *((k, unet, 2) for k in unet if k.endswith("attn2.to_k.weight"))):
        if key in sd and sd[key].ndim != ndim:      # detection below reads shape[1] of each
            raise CheckpointError(f"{where}: {key} is a {sd[key].ndim}-D tensor of shape {tuple(sd[key].shape)}; "
                                  f"an {layout.title} checkpoint has a {ndim}-D tensor there")
    linear = any(k.endswith("proj_in.weight") and t.ndim == 2 for k, t in unet.items())
    return unet["input_blocks.0.0.weight"].shape[1], linear


def family_of(where, stages: dict[str, dict[str, Tensor]], layout: list[Family],
              prediction_type: str | None = None) -> Family:
    """The family of split stages among the candidates `layout` (layout_of's list; for a diffusers
    folder every family, named as layout[0] names the text encoder), by the UNet's traits; a one-line
    CheckpointError naming what the file looks like if no supported family has them. `prediction_type`
    (a folder's scheduler config) picks among families with the same traits."""
    unet = stages["unet"]
    channels, linear = traits(where, stages, layout[0])
    matches = [f for f in layout if (f.unet_in_channels, f.linear_proj) == (channels, linear)]
    if not matches:  # another layout's family (e.g. SD 2.x's linear proj_in under SD 1.x's text keys)?
        other = next((f for f in families.FAMILIES.values() if (f.unet_in_channels, f.linear_proj) == (channels, linear)), None)
        if other is not None:
            why = "linear proj_in in the UNet's transformers" if linear else "1x1-conv proj_in in the UNet's transformers"
            raise unsupported(where, f"an {other.title} UNet ({why}) with the text encoder keys of "
                                     f"{layout[0].title} ({layout[0].prefixes['text_encoder']}*)")
        what = "an InstructPix2Pix-style UNet" if channels == 8 else "a UNet"
        known = ", ".join(f"{f.title}: {f.unet_in_channels}" for f in layout)
        raise unsupported(where, f"{what} with {channels} input channels ({known})")
    to_k = next((t for k, t in unet.items() if k.endswith("attn2.to_k.weight")), None)
    widths = [stages.get(stage, {}).get(key) for stage, key in layout[0].text_width_keys.items()]
    if to_k is not None and all(w is not None for w in widths) and to_k.shape[1] != sum(w.shape[1] for w in widths):
        towers = " + ".join(str(w.shape[1]) for w in widths)
        raise unsupported(where, f"a model whose UNet attends to a {to_k.shape[1]}-wide context while its "
                                 f"text encoder{'s are' if len(widths) > 1 else ' is'} {towers} wide "
                                 f"(SD 1.x: 768, SD 2.x: 1024, SDXL: 768 + 1280)")
    fam = next((f for f in matches if f.prediction_type == prediction_type), matches[0])
    if not fam.supported:
        raise unsupported(where, fam.looks_like)
    return fam


def twins(family: Family, layout: list[Family]) -> list[Family]:
    """The families of `layout` with `family`'s detection traits: one network, different predictions
    (SD 2.x's 512-base and 768-v); [family] alone when the tensors settle it."""
    return [f for f in layout if f.supported and (f.unet_in_channels, f.linear_proj) ==
            (family.unet_in_channels, family.linear_proj)]
