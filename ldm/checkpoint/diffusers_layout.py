"""The one table between the diffusers-folder layout and ours (the CompVis single-file names).

A diffusers folder names the same tensors differently (down_blocks.0.resnets.0.norm1 is
input_blocks.1.0.in_layers.0); `key_map(config)` builds the table for a block structure,
`diffusers_to_compvis` renames a component's state dict with it, and `format_key_map()` prints it.
tests/test_checkpoint.py checks it both ways, against diffusers' own single-file converter.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ldm.checkpoint.errors import CheckpointError

__all__ = ["INNER_RENAMES", "KeyMapConfig", "key_map", "DIFFUSERS_TO_COMPVIS", "format_key_map",
           "diffusers_to_compvis"]

# A row (diffusers_prefix, compvis_prefix, inner) renames a whole subtree. inner == "" keeps the
# names below the prefix (a SpatialTransformer is named alike in both layouts); otherwise it
# names the table that renames the modules inside the block:
INNER_RENAMES = {
    "unet_resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "vae_resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                   "conv_shortcut": "nin_shortcut"},
    # diffusers >= 0.14 names first, then the older names some VAE files still carry.
    # q/k/v/proj_out are 1x1 convolutions in CompVis, linear layers in diffusers (reshaped below).
    "vae_attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                      "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"},
}


MAX_LEVELS, MAX_LAYERS = 8, 16                   # SD 1.x: 4 levels, 2 layers per block


@dataclass(frozen=True)
class KeyMapConfig:
    """The block structure the key map depends on; defaults are SD 1.x."""
    unet_levels: int = 4                            # len(block_out_channels)
    unet_layers_per_block: int = 2                  # ResBlocks per level on the way down (+1 going up)
    unet_attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer
    vae_levels: int = 4
    vae_layers_per_block: int = 2
    unet_label_emb: bool = False                    # SDXL: a vector y through label_emb (diffusers' add_embedding)

    @classmethod
    def tiny(cls) -> KeyMapConfig:
        return cls(unet_levels=3, unet_layers_per_block=2, unet_attention_levels=(0, 1),
                   vae_levels=2, vae_layers_per_block=2)

    @classmethod
    def from_diffusers(cls, unet_config: dict, vae_config: dict) -> KeyMapConfig:
        """Build it from the config.json of a diffusers unet/ and vae/ (each checked: a block-type
        list of at most MAX_LEVELS strings, layers_per_block an integer in 1..MAX_LAYERS)."""
        for name, config, keys in (("unet", unet_config, ("down_block_types", "up_block_types")),
                                   ("vae", vae_config, ("block_out_channels",))):
            if not isinstance(config, dict):
                raise CheckpointError(f"{name} config: a {type(config).__name__}, not a JSON object")
            for key in keys:
                v = config.get(key)
                if not (isinstance(v, (list, tuple)) and 1 <= len(v) <= MAX_LEVELS
                        and all(isinstance(x, (str if key.endswith("types") else int)) for x in v)):
                    raise CheckpointError(f"{name} config: {key}={str(v)[:80]}; allowed: a list of 1 to "
                                          f"{MAX_LEVELS} {'strings' if key.endswith('types') else 'integers'}")
            layers = config.get("layers_per_block", 2)
            for n in (layers if isinstance(layers, (list, tuple)) and len(layers) <= MAX_LEVELS else [layers]):
                if not (type(n) is int and 1 <= n <= MAX_LAYERS):
                    raise CheckpointError(f"{name} config: layers_per_block={str(layers)[:80]}; allowed: "
                                          f"an integer from 1 to {MAX_LAYERS}")
        down, up = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
        attention = tuple(i for i, t in enumerate(down) if "CrossAttn" in t)
        if [("CrossAttn" in t) for t in reversed(up)] != [("CrossAttn" in t) for t in down]:
            raise CheckpointError(f"unet config: up_block_types {up} do not mirror down_block_types {down}")
        layers = unet_config.get("layers_per_block", 2)
        layers = set(layers) if isinstance(layers, (list, tuple)) else {layers}
        if len(layers) != 1:
            raise CheckpointError(f"unet config: layers_per_block={unet_config['layers_per_block']} "
                                  "differs between levels; SD 1.x uses one value")
        return cls(unet_levels=len(down), unet_layers_per_block=int(layers.pop()), unet_attention_levels=attention,
                   unet_label_emb=unet_config.get("addition_embed_type") == "text_time",
                   vae_levels=len(vae_config["block_out_channels"]),
                   vae_layers_per_block=int(vae_config.get("layers_per_block", 2)))


def key_map(config: KeyMapConfig = KeyMapConfig()) -> dict[str, list[tuple[str, str, str]]]:
    """The diffusers -> CompVis table for a block structure: {stage: [(diffusers, compvis, inner)]}."""
    c = config
    unet = [("conv_in", "input_blocks.0.0", ""),
            ("time_embedding.linear_1", "time_embed.0", ""), ("time_embedding.linear_2", "time_embed.2", "")]
    if c.unet_label_emb:                            # SDXL's y MLP: sgm's label_emb.0, diffusers' add_embedding
        unet += [("add_embedding.linear_1", "label_emb.0.0", ""), ("add_embedding.linear_2", "label_emb.0.2", "")]
    k = 1                                           # input_blocks.0 is conv_in
    for level in range(c.unet_levels):
        for j in range(c.unet_layers_per_block):
            unet.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0", "unet_resnet"))
            if level in c.unet_attention_levels:
                unet.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1", ""))
            k += 1
        if level < c.unet_levels - 1:               # every level but the last ends in a Downsample
            unet.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op", ""))
            k += 1
    unet += [("mid_block.resnets.0", "middle_block.0", "unet_resnet"),
             ("mid_block.attentions.0", "middle_block.1", ""),
             ("mid_block.resnets.1", "middle_block.2", "unet_resnet")]
    k = 0
    for i in range(c.unet_levels):                  # up_blocks.i is level (levels - 1 - i)
        level = c.unet_levels - 1 - i
        attention = level in c.unet_attention_levels
        for j in range(c.unet_layers_per_block + 1):
            unet.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", "unet_resnet"))
            if attention:
                unet.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", ""))
            if j == c.unet_layers_per_block and level > 0:   # Upsample sits after the attention, if any
                unet.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attention else 1}.conv", ""))
            k += 1
    unet += [("conv_norm_out", "out.0", ""), ("conv_out", "out.2", "")]

    vae = [("quant_conv", "quant_conv", ""), ("post_quant_conv", "post_quant_conv", "")]
    for part in ("encoder", "decoder"):
        vae += [(f"{part}.conv_in", f"{part}.conv_in", ""), (f"{part}.conv_norm_out", f"{part}.norm_out", ""),
                (f"{part}.conv_out", f"{part}.conv_out", ""),
                (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "vae_resnet"),
                (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "vae_attention"),
                (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "vae_resnet")]
    for level in range(c.vae_levels):
        for j in range(c.vae_layers_per_block):
            vae.append((f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", "vae_resnet"))
        if level < c.vae_levels - 1:
            vae.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv", ""))
    for i in range(c.vae_levels):                   # the decoder counts its levels upwards: up.3 runs first
        level = c.vae_levels - 1 - i
        for j in range(c.vae_layers_per_block + 1):
            vae.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", "vae_resnet"))
        if level > 0:
            vae.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", ""))

    # transformers < 5 saved CLIPTextModel keys under text_model.; transformers 5 saves them without.
    text_encoder = [("text_model", "text_model", ""), ("", "text_model", "")]
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


DIFFUSERS_TO_COMPVIS = key_map()                    # the SD 1.x table


def format_key_map(table: dict | None = None) -> str:
    """The key map as aligned text, one row per block, then the renames inside blocks."""
    table = DIFFUSERS_TO_COMPVIS if table is None else table
    lines = []
    for stage, rows in table.items():
        width = max(len(d) for d, _, _ in rows) + 2
        lines.append(f"{stage}: {len(rows)} rows (diffusers -> CompVis)")
        lines += [f"  {d or '(no prefix)':<{width}}-> {c}" + (f"  [{inner}]" if inner else "") for d, c, inner in rows]
    for name, renames in INNER_RENAMES.items():
        lines.append(f"[{name}] inside the block")
        lines += [f"  {d:<16}-> {c}" for d, c in renames.items()]
    return "\n".join(lines)


def diffusers_to_compvis(stage: str, state_dict: dict[str, Tensor], table: dict | None = None) -> dict[str, Tensor]:
    """Rename one diffusers component's state dict to our (CompVis) names with the key map."""
    table = DIFFUSERS_TO_COMPVIS if table is None else table
    if stage not in table:
        raise ValueError(f"stage={stage!r}; allowed: {list(table)}")
    rows = {r[0]: r for r in table[stage]}
    out, unmatched = {}, []
    for key, t in state_dict.items():
        parts = key.split(".")                         # the longest prefix with a row wins
        row = next((rows[p] for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if p in rows),
                   None)
        if row is None:
            unmatched.append(key)
            continue
        d, c, inner = row
        rest = key[len(d) + 1:] if d else key
        if inner:
            module, _, param = rest.rpartition(".")
            if module not in INNER_RENAMES[inner]:
                unmatched.append(key)
                continue
            rest = f"{INNER_RENAMES[inner][module]}.{param}"
            if inner == "vae_attention" and param == "weight" and t.ndim == 2:
                t = t[:, :, None, None]              # linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[f"{c}.{rest}"] = t
    if unmatched:
        raise CheckpointError(f"{stage}: {len(unmatched)} diffusers keys have no row in the key map, "
                              f"e.g. {unmatched[:5]}; is this an SD 1.x {stage}?")
    return out
