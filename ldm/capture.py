"""Look inside a network during its forward passes: feature maps and attention probabilities.

One API for every stage (`UNetModel.capture`, `AutoencoderKL.capture` both have this shape):

    with unet.capture(features=["middle_block"], attention=unet.attention_layers()) as cap:
        eps = unet(x, t, context)
    with vae.capture(features=["encoder.down.0", "decoder.up.3"], attention=["decoder.mid.attn_1"]) as cap:
        image = vae.decode(vae.encode(x).mode())

    cap.features[name]    the output of module `name` (any name of named_modules()), e.g. (B, C, H, W)
    cap.attention[name]   the attention probabilities of layer `name`          (B, heads, N = H*W, M)
    cap.sizes[name]       the (H, W) of the feature map that layer attended over
    cap.token_maps(name)  the probabilities as one image per key                (B, heads, M, H, W)

For every forward inside the `with` block the last one wins; the tensors are detached, and the
hooks are removed on exit. An attention layer is a module with a `probs_hook` attribute (ldm's
attention modules have one): while it is set, the layer runs ldm.attention's math backend, the one
that forms the probabilities, and hands them to the hook. `spatial_of(name)` names the module whose
input is the (B, C, H, W) map the layer attends over (the layer itself in the VAE; the enclosing
SpatialTransformer in the UNet, whose attention sees H*W tokens).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from einops import rearrange
from torch import Tensor, nn

__all__ = ["Capture", "capture"]


@dataclass
class Capture:
    """What a capture recorded during the last forward inside its `with` block.

    features[name]   output of module `name`, e.g. "input_blocks.4" (B, C, H, W)
    attention[name]  probabilities of attention layer `name`      (B, heads, H*W, M)
    sizes[name]      the (H, W) of the feature map that layer attended over
    """
    features: dict[str, Tensor] = field(default_factory=dict)
    attention: dict[str, Tensor] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def token_maps(self, name: str) -> Tensor:
        """Attention of layer `name` as images, one per key token: (B, heads, M, H, W)."""
        H, W = self.sizes[name]
        return rearrange(self.attention[name], "b heads (h w) m -> b heads m h w", h=H, w=W)


@contextmanager
def capture(model: nn.Module, features: Sequence[str] = (), attention: Sequence[str] = (), *,
            layers: Sequence[str] | None = None, spatial_of: Callable[[str], str] = lambda name: name,
            what: str | None = None) -> Iterator[Capture]:
    """Record the outputs of the modules named in `features` and the attention probabilities of the
    layers named in `attention` (one of `layers`: default, every module with a probs_hook attribute).
    `what` names the model in errors (default: its class)."""
    modules = dict(model.named_modules())
    what = what or type(model).__name__
    layers = list(layers) if layers is not None else [n for n, m in modules.items() if hasattr(m, "probs_hook")]
    for name in features:
        if name not in modules or name == "":
            raise ValueError(f"capture: features entry {name!r} is not a module of {what} "
                             f"(some that are: {[n for n in modules if n][:8]})")
    for name in attention:
        if name not in layers:
            raise ValueError(f"capture: attention entry {name!r} is not an attention layer; valid names: {layers}")
    cap, handles, hooked = Capture(), [], []

    def store_feature(name):
        return lambda module, args, out: cap.features.__setitem__(name, out.detach())

    def store_size(name):
        return lambda module, args: cap.sizes.__setitem__(name, tuple(args[0].shape[-2:]))

    def store_probs(name):
        return lambda probs: cap.attention.__setitem__(name, probs.detach())

    try:
        for name in features:
            handles.append(modules[name].register_forward_hook(store_feature(name)))
        for name in attention:
            handles.append(modules[spatial_of(name)].register_forward_pre_hook(store_size(name)))
            modules[name].probs_hook = store_probs(name)
            hooked.append(modules[name])
        yield cap
    finally:
        for handle in handles:
            handle.remove()
        for module in hooked:
            module.probs_hook = None
