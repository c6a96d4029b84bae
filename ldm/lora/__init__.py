"""LoRA files as users have them: read one, find the modules it adapts, merge it (and unmerge exactly).

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation") stores, for some Linear and Conv2d modules of
the UNet and the text encoders, two thin matrices `down` (r, in) and `up` (out, r) and a number
alpha. With a user weight m the adapted module computes

    y = W x + m * (alpha / r) * up(down(x))          i.e.  W' = W + m * (alpha / r) * up @ down

For a convolution `down` is a conv with the module's kernel (r, in, kh, kw; 1x1, or 3x3 for LoCon's
ResBlock convs) and `up` a 1x1 conv (out, r, 1, 1), so the merged delta is up @ down.flatten(1).

    from ldm import lora
    lo = lora.read("weights/lcm-lora-sdxl.safetensors")         # any of the formats below
    handle = lora.apply(pipe.stages, [(lo, 1.0)])               # merged into the weights (stage -> network)
    ...
    handle.unmerge()                                             # the original tensors, bit for bit

Formats (`LoRA.format`), told apart by their keys:

    kohya    lora_unet_<module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha
             lora_te_text_model_encoder_layers_0_self_attn_q_proj.* (text encoder); SDXL's two towers
             lora_te1_ (CLIP ViT-L) and lora_te2_ (OpenCLIP ViT-bigG). A1111, kohya-ss, ComfyUI and most
             downloads. UNet paths use diffusers block names (down_blocks_0_..., as the LCM-LoRAs for
             SD 1.5 and SDXL do) or CompVis ones (input_blocks_1_1_..., as kohya-ss trains SDXL);
             alpha missing or 0 means alpha = r.
    peft     unet.<diffusers path>.lora_A.weight / .lora_B.weight, text_encoder.<path>.lora_A.weight,
             text_encoder_2.<path>... (SDXL); r and lora_alpha (and alpha_pattern) per component in the
             safetensors metadata "lora_adapter_metadata"; no metadata means alpha = r (scale 1), as in
             diffusers.
    legacy   diffusers before peft: unet.<path>.processor.to_q_lora.down.weight (attention processors),
             <path>.lora.down.weight, text_encoder.<path>.lora_linear_layer.down.weight, ...to_q_lora...

Stages are the pipeline's (diffusers' component names): unet, text_encoder, and text_encoder_2 for
SDXL. What a stage holds decides the names its modules have in files (layers.NAMINGS): a UNet of any
levels and transformer depths (SD 1.x, 2.x, SDXL's 3 levels, 10-deep transformers and label_emb =
diffusers' add_embedding), CLIP ViT-L (transformers' names are ours), or an OpenCLIP tower (SD 2.x's
ViT-H, SDXL's bigG), which files name in transformers' CLIPTextModel names while ldm keeps open_clip's:
out_proj -> attn.out_proj, fc1 / fc2 -> mlp.c_fc / c_proj, and q_proj / k_proj / v_proj -> rows
[0:C], [C:2C], [2C:3C] of the fused attn.in_proj_weight (3C, C) (a `Target` with rows). Merging
changes those rows only, and unmerge restores the tensor bit for bit; merge=False refuses them (a
forward hook on a module sees the fused projection only after attention has used it), in one line.

Underscores are ambiguous (is `down_blocks_0_attentions_0_proj_in` down_blocks.0.attentions.0.proj_in
or down.blocks...?), so a file's names are never parsed: `module_table` lists every Linear/Conv2d of
our model under its own (CompVis / open_clip) name, its diffusers / transformers names (from
ldm.checkpoint's key map, layers.OPENCLIP_NAMES) and all of them with dots replaced by underscores, and
a file's name is looked up there (as ComfyUI and A1111 do). Everything is checked - names, shapes,
ranks, numbers - before any weight is touched. A file made for another family is named as such in
one line ("this LoRA is for SDXL (lora_te2_ keys), the pipeline is SD 1.x"; the reverse from the width
of its cross-attention keys or UNet names the pipeline lacks: LoRA.mismatch). A file is data, never
code: its alpha_pattern keys are matched as module names, not run as regular expressions, and every
name a file provides is quoted and cut before it reaches a message.

One concept per file, each importing only the ones above it:

    layers.py   what a file holds, normalised (LoRALayer, LoRA and its resolve / targets), the table of
                every adaptable module under each name a file may use (targets, module_table, Target),
                the family a file that does not fit was made for (LoRA.mismatch, family_title),
                LoRAError and the quoting of file-provided names in messages
    formats.py  reading: the kohya / peft / legacy keys, the matrices' checks, kohya's .alpha and peft's
                adapter metadata (alpha_pattern as module names) -> a LoRA (read, from_state_dict)
    merge.py    applying: every delta checked, then merged (exactly undone; row blocks into their rows)
                or hooked (apply, Applied), and the CLI's PATH[:WEIGHT] (parse_spec)
    __init__.py this: the names above, importable as ldm.lora.<name>
"""
from ldm.lora.layers import (MAX_LISTED, MAX_QUOTED, NAMINGS, OPENCLIP_NAMES, PLAIN_NAME, LoRA, LoRAError, LoRALayer,
                             Target, family_title, module_table, targets)
from ldm.lora.formats import (DOTTED_PREFIXES, DOTTED_SUFFIXES, FORMATS, JSON_TYPES, KOHYA_PREFIXES,
                              KOHYA_SDXL_PREFIXES, MAX_PATTERN_KEY_CHARS, MAX_PATTERN_KEYS, REGEX_SYNTAX,
                              from_state_dict, read)
from ldm.lora.merge import Applied, apply, parse_spec

__all__ = ["LoRA", "LoRALayer", "LoRAError", "Target", "Applied", "FORMATS", "read", "from_state_dict", "apply",
           "module_table", "targets", "family_title", "parse_spec"]
