"""What a checkpoint's UNet predicts, for the families whose tensors cannot tell: SD 2.x.

SD 2.x's 512-base model predicts the noise (epsilon); its 768-v model predicts the velocity
v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022). The two files have the same tensors,
so something else has to say which. The rule, in order; the first that answers wins, and
`Checkpoint.prediction_reason` (printed by `ldm info`) says which one did:

1. the user: ldm.load(..., prediction_type=...), `ldm generate --prediction-type ...`
   (ldm.pipeline checks it against the family's choices);
2. a diffusers folder: scheduler/scheduler_config.json's prediction_type (ldm.checkpoint.files);
3. a .safetensors header, Stability's model spec: modelspec.prediction_type ("v" or "epsilon"),
   else modelspec.architecture naming a family's variant ("stable-diffusion-v2-768-v");
   ldm writes both (ldm.checkpoint.write.modelspec_metadata);
4. a `v_pred` entry in the file: the marker tensor ComfyUI and Forge look for;
5. a YAML config beside the file with the same name (v2-1_768-ema-pruned.yaml, as the AUTOMATIC1111
   web UI reads it): `parameterization: "v"` under model.params is v, a config without it epsilon;
6. the UNet itself, the AUTOMATIC1111 web UI's test (sd_models_config.py,
   is_using_v_parameterization_for_sd2): run it once at t = 999 on a latent of 0.5 everywhere
   (1, 4, 8, 8) with a context of 0.5 (1, 2, width), and call it v when mean(out - x) < -1.

Why step 6 works. At t = 999, sqrt(abar) = 0.068: the input is as good as pure noise. An epsilon
model then returns about its input (eps = (x - sqrt(abar) x0) / sqrt(1 - abar) ~ x), so
mean(out - x) ~ 0. A v model returns v = (sqrt(abar) x - x0) / sqrt(1 - abar) ~ 0.068 x - x0_hat,
its guess of the clean latent with the sign flipped, so mean(out - x) ~ -0.47 - mean(x0_hat): far
below zero when the model's guess of a clean latent is positive on average, as SD's latents
from a constant input are. The threshold -1 is the web UI's, set on the real SD 2.x weights.
tests/test_sd2.py checks the test on ldm's trained shapes model (epsilon, and the same network's
output turned exactly into v) and on UNets whose output is known.

diffusers' single-file loader guesses differently: v unless the file's global_step is 875000
(SD 2.0-base's count), which its own code calls brittle; ldm does not use it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ldm.checkpoint.errors import CheckpointError
from ldm.families import Family

__all__ = ["MODELSPEC_NAME", "declared", "from_yaml", "probe", "probe_state_dict", "PROBE_T", "PROBE_THRESHOLD"]

# the model spec's words ("v", "epsilon") <-> ours; reading also takes "eps" and our own "v_prediction"
MODELSPEC_NAME = {"epsilon": "epsilon", "v_prediction": "v"}
MODELSPEC_PREDICTION = {**{v: k for k, v in MODELSPEC_NAME.items()}, "eps": "epsilon", "v_prediction": "v_prediction"}
PROBE_T, PROBE_VALUE, PROBE_THRESHOLD = 999, 0.5, -1.0
MAX_YAML_BYTES = 1 << 20  # a Stability inference config is about 2 KB


def declared(where, candidates: list[Family], metadata: dict[str, str], raw: dict,
             path: Path | None) -> tuple[str, str] | None:
    """(prediction_type, reason) from what the file says (steps 3-5 above), or None if it says nothing.
    `candidates` are the families the tensors fit (the same network, different predictions)."""
    spec = metadata.get("modelspec.prediction_type")
    if spec is not None:
        if spec not in MODELSPEC_PREDICTION:
            raise CheckpointError(f"{where}: modelspec.prediction_type={_show(spec)}; allowed: v, epsilon")
        return MODELSPEC_PREDICTION[spec], f"the file's metadata says modelspec.prediction_type={spec}"
    arch = metadata.get("modelspec.architecture")
    named = next((f for f in candidates if f.modelspec is not None and f.modelspec == arch), None)
    if named is not None:
        return named.prediction_type, f"the file's metadata says modelspec.architecture={arch}"
    if "v_pred" in raw:
        return "v_prediction", "the file has a v_pred entry"
    yaml_path = path.with_suffix(".yaml") if path is not None else None
    if yaml_path is not None and yaml_path.is_file():
        return from_yaml(yaml_path), f"{yaml_path.name} beside it says so"
    return None


def _show(value) -> str:
    """A value from a file, safe to print: a string quoted and cut, anything else by its type only
    (str() of a YAML alias bomb expands it: a few hundred bytes of file, gigabytes of text)."""
    return repr(value[:40]) if isinstance(value, str) else f"a {type(value).__name__}"


def _yaml_loader():
    """yaml.SafeLoader (data only: no tags that build objects) that also refuses aliases (*name): a
    Stability config has none, and aliases are how a small YAML file becomes an exponential structure."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a model config",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


def from_yaml(path: Path) -> str:
    """The prediction type a Stability inference config (v2-inference-v.yaml) names: model.params.parameterization."""
    import yaml

    with open(path, "rb") as f:                # read at most the cap, whatever the size said a moment ago
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise CheckpointError(f"{path}: over {MAX_YAML_BYTES} bytes; a model config is at most {MAX_YAML_BYTES}")
    try:
        config = yaml.load(data.decode("utf-8"), Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable YAML model config ({' '.join(str(e).split())[:120]})") from None
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: no model.params mapping; expected a Stability inference config "
                              f"(v2-inference.yaml / v2-inference-v.yaml)")
    value = params.get("parameterization", "eps")
    if not isinstance(value, str) or value not in ("eps", "v", "x0"):
        raise CheckpointError(f"{path}: model.params.parameterization={_show(value)}; allowed: eps, v, x0")
    return {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[value]


@torch.no_grad()
def probe(unet: torch.nn.Module, in_channels: int, context_dim: int) -> tuple[str, float]:
    """Step 6: ("v_prediction" or "epsilon", mean(out - x)) from one UNet call at t = 999 on constant inputs."""
    p = next(unet.parameters())
    x = torch.full((1, in_channels, 8, 8), PROBE_VALUE, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, context_dim), PROBE_VALUE, dtype=p.dtype, device=p.device)
    t = torch.tensor([PROBE_T], device=p.device)
    score = (unet(x, t, context).float() - x.float()).mean().item()
    return ("v_prediction" if score < PROBE_THRESHOLD else "epsilon"), score


def probe_state_dict(where, unet_state: dict[str, Tensor], unet_class, config) -> tuple[str, str]:
    """Step 6 on a UNet state dict: build it (no copy of the weights but a float32 cast of half ones), run the probe."""
    with torch.device("meta"):
        unet = unet_class(config)
    try:
        unet.load_state_dict(unet_state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the UNet does not fit {unet_class.__name__} "
                              f"({' '.join(str(e).split())[:200]})") from None
    unet = unet.float().eval()
    prediction, score = probe(unet, config.in_channels, config.context_dim)
    sign = "<" if score < PROBE_THRESHOLD else ">="
    return prediction, (f"the UNet's test at t={PROBE_T} on constant input gave mean(out - x) = {score:.3f} "
                        f"{sign} {PROBE_THRESHOLD:g} (the AUTOMATIC1111 web UI's rule)")
