"""What the explorer's page may ask for: the JSON body of POST /api/run, checked field by field.

    req = parse(json_text, layers=["input_blocks.1.1.transformer_blocks.0.attn2", ...], default_layer=...)
    req.prompt, req.steps, req.guidance, req.seed, req.sampler, req.negative_prompt, req.num_images, req.layer

Every field has a default, so `{}` is a valid request. A value outside what is allowed raises
BadRequest, a ValueError that names the field, repeats the value (shortened) and says what is
allowed; the server answers it with 400 and {"error": str(e), "field": e.field}. The limits are
tighter than the library's own (ldm.options.check still runs inside the pipeline): the page is a
door that anything on this machine can knock on, so one request may cost at most LIMITS' worth of
work. JSON has one number type, so 20.0 is accepted as the integer 20; NaN and Infinity (which
Python's json reads) are refused by the field they arrive in.
"""
from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, fields

from ldm import samplers

__all__ = ["BadRequest", "Request", "LIMITS", "MAX_BODY_BYTES", "parse"]

MAX_BODY_BYTES = 16 * 1024  # a request is a handful of fields; two 1000-character prompts fit with room
LIMITS = {
    "prompt": 1000,          # characters (the tokenizer keeps 75 tokens; the rest is reported as dropped)
    "negative_prompt": 1000,
    "steps": (1, 50),
    "guidance": (0.0, 30.0),
    "seed": (0, 2**32 - 1),  # a uint32, exact in JavaScript's numbers
    "num_images": (1, 4),
}

_short = reprlib.Repr()
_short.maxstring, _short.maxother = 60, 60


class BadRequest(ValueError):
    """One field of a request is not allowed: `field` names it, the message says why in one line."""

    def __init__(self, field: str, value, allowed: str):
        self.field = field
        super().__init__(f"{field}={_short.repr(value)} {allowed}")


@dataclass(frozen=True)
class Request:
    """One run of the explorer: the generation's settings and the attention layer to show."""

    prompt: str = "a red circle above a blue square"
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    sampler: str = "euler"
    num_images: int = 1
    layer: str | None = None  # a cross-attention layer of the UNet; None: the server's default


def _text(name: str, v) -> str:
    if not isinstance(v, str):
        raise BadRequest(name, v, "must be a string")
    if len(v) > LIMITS[name]:
        raise BadRequest(name, v, f"is {len(v)} characters; at most {LIMITS[name]} are allowed")
    return v


def _int(name: str, v) -> int:
    lo, hi = LIMITS[name]
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)  # JSON's one number type: 20.0 is 20
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(name, v, f"must be an integer in [{lo}, {hi}]")
    if not lo <= v <= hi:
        raise BadRequest(name, v, f"is outside [{lo}, {hi}]")
    return v


def _number(name: str, v) -> float:
    lo, hi = LIMITS[name]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BadRequest(name, v, f"must be a finite number in [{lo}, {hi}]")
    if not lo <= v <= hi:
        raise BadRequest(name, v, f"is outside [{lo}, {hi}]")
    return float(v)


def parse(body: str | bytes, layers: list[str], default_layer: str) -> Request:
    """The request in `body` (JSON text), every field checked; BadRequest names the first bad one."""
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadRequest("body", body[:60], f"is not JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise BadRequest("body", data, "must be a JSON object of fields")
    names = [f.name for f in fields(Request)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise BadRequest(str(unknown[0])[:60], data[unknown[0]], f"is not a field; allowed: {', '.join(names)}")
    d = Request()
    sampler = data.get("sampler", d.sampler)
    if not isinstance(sampler, str) or sampler not in samplers.SAMPLERS:
        raise BadRequest("sampler", sampler, f"is not a sampler; allowed: {', '.join(samplers.SAMPLERS)}")
    layer = data.get("layer")
    layer = default_layer if layer is None else layer
    if not isinstance(layer, str) or layer not in layers:
        raise BadRequest("layer", layer, f"is not a cross-attention layer of this UNet; allowed: {', '.join(layers)}")
    return Request(prompt=_text("prompt", data.get("prompt", d.prompt)),
                   negative_prompt=_text("negative_prompt", data.get("negative_prompt", d.negative_prompt)),
                   steps=_int("steps", data.get("steps", d.steps)),
                   guidance=_number("guidance", data.get("guidance", d.guidance)),
                   seed=_int("seed", data.get("seed", d.seed)),
                   sampler=sampler,
                   num_images=_int("num_images", data.get("num_images", d.num_images)),
                   layer=layer)
