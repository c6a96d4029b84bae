"""Prompts -> conditioning the A1111 way: weights, 75-token chunks, BREAK, CLIP skip, embeddings.

The plain path (ldm.tokenizer then ldm.clip) reads 75 tokens and drops the rest. AUTOMATIC1111's
web UI reads a prompt differently, and most prompts shared online are written for it:

    "a (red:1.3) fox, [blurry] BREAK snow"
      1. parse     weights from brackets            [("a ", 1.0), ("red", 1.3), (" fox, ", 1.0),
                                                     ("blurry", 0.909), BREAK, ("snow", 1.0)]
      2. chunk     tokens into chunks of 75, each   ids (n, 77), weights (n, 77)
                   BOS + 75 + EOS; BREAK starts a new chunk, a full chunk moves its tail after
                   the last comma (within 20 tokens) to the next one
      3. encode    each chunk through CLIP on its own, with CLIP skip N: hidden_states[-N],
                   then the final layer norm                         (n, 77, C)
      4. weight    z = z * w per token, then z = z * (mean before / mean after), per chunk
      5. concat    the chunks along the token axis                   (1, 77 n, C)

The UNet's cross-attention takes any number of context tokens, so (B, 154, 768) works as well
as (B, 77, 768); the negative prompt must have as many chunks as the prompt, which `encode` does
by padding a batch with empty chunks (A1111 pads the shorter one with its empty-prompt chunk).

Bracket syntax (modules/prompt_parser.py, parse_prompt_attention): "(x)" multiplies x's weight
by 1.1, "[x]" by 1 / 1.1, "(x:1.3)" by 1.3; they nest by multiplying: "((x))" is 1.21;
"\\(", "\\)", "\\[", "\\]", "\\\\" are the literal characters; "BREAK" (capitals, a word on its own)
forces a new chunk. Where this module differs from A1111, it says so with an error:
A1111 silently accepts an unclosed "(" (weighting the rest of the prompt), a stray ")" (kept as
text) and a weight that is not a number ("(x:abc)" is text there, "(x:1.2.3)" crashes); here
each is one line naming the prompt, the place and what was expected ("\\:" is a literal colon).
A BREAK inside brackets is still a BREAK here (A1111 weights it, and then reads it as text).
The mean is restored per prompt and chunk; A1111 takes it over the whole batch's chunk, which
is the same for one prompt at a time, as its sampler calls it.

CLIP skip counts as A1111's setting does: clip_skip=1 is the last layer (SD 1.x), 2 the one
before (what NovelAI-derived checkpoints want). diffusers' `encode_prompt(clip_skip=k)` counts
the layers skipped, so A1111's N is diffusers' k = N - 1, and ldm.clip's `clip_skip=N - 1`.

Textual inversion: an embedding file holds n learned vectors of the text encoder's width. It is
added as n new tokens "name", "name_1", ... (diffusers' convention): the tokenizer learns the
words (`CLIPTokenizer.add_tokens`), the text encoder's embedding table grows by n rows
(`CLIPTextModel.add_embeddings`), and the prompt word "name" stands for all n. Formats:
A1111 .pt {"string_to_param": {"*": (n, C)}, "name", "step", ...}, read by ldm.checkpoint's
restricted unpickler (no code runs); A1111/kohya .safetensors {"emb_params": (n, C)}; diffusers
learned_embeds.safetensors / .bin {"<token>": (C,) or (n, C)}. The prompt word is `name=` if
given, else the diffusers key, else the file's stem (A1111 uses the file name, not the name
stored inside).

References: AUTOMATIC1111/stable-diffusion-webui modules/prompt_parser.py, sd_hijack_clip.py,
sd_emphasis.py ("Original"), textual_inversion/textual_inversion.py; diffusers
loaders/textual_inversion.py; Gal et al. 2022, "An Image is Worth One Word" (textual inversion).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange

from ldm import checkpoint

__all__ = ["BREAK", "PromptError", "EmbeddingError", "Chunk", "Embedding", "parse", "chunk",
           "tokenize", "apply_weights", "encode", "read_embedding", "load_embedding"]

BREAK = ("BREAK", -1.0)  # the marker parse() puts where "BREAK" starts a new chunk (A1111's)
ROUND, SQUARE = 1.1, 1 / 1.1  # "(x)" and "[x]" multipliers
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


class PromptError(ValueError):
    """A prompt's bracket syntax is broken: which prompt, where, and what was expected."""


class EmbeddingError(ValueError):
    """An embedding file cannot be added: which file, and what was expected."""


# --- 1. parse: brackets -> (text, weight) pieces -----------------------------------------------

_TOKEN = re.compile(r"""
    \\[()\[\]\\:]                  # escaped character: itself
  | \\                             # a lone backslash: dropped (as A1111 does)
  | \( | \[                        # open a group
  | :\s*([^\s()\[\]\\:]*)\s*\)     # ":1.3)" closes a round group with that weight
  | \) | \]                        # close a group: x 1.1, x 1/1.1
  | [^\\()\[\]:]+                  # plain text
  | :                              # a colon that is not a weight: text
""", re.X)
_NUMBER = re.compile(r"[+-]?[.\d]+")  # what A1111 accepts as a weight (then float() must agree)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _show(text: str, at: int) -> str:
    """The prompt for an error line: whole if short, else the 60 characters around `at`."""
    if len(text) <= 100:
        return repr(text)
    a = max(0, at - 30)
    return f"{'...' if a else ''}{text[a:a + 60]!r}..."


def parse(text: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention: text -> [(text, weight), ...], BREAK markers in between.

    Runs of equal weight are merged, so "an (important) word" ->
    [("an ", 1.0), ("important", 1.1), (" word", 1.0)]. Unbalanced brackets and weights
    that are not numbers raise PromptError.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt={text!r} must be a str (got {type(text).__name__})")
    res: list[list] = []  # [text, weight]; BREAK pieces are [*BREAK] and are never weighted
    open_round: list[tuple[int, int]] = []  # (index in res where the group starts, character)
    open_square: list[tuple[int, int]] = []

    def multiply(start: int, factor: float) -> None:
        for piece in res[start:]:
            if tuple(piece) != BREAK:
                piece[1] *= factor

    def close(stack, at: int, char: str, opener: str, factor: float) -> None:
        if not stack:
            raise PromptError(f"prompt {_show(text, at)}: {char!r} at character {at} closes no "
                              f"{opener!r}; write \\{char} for a literal {char}")
        multiply(stack.pop()[0], factor)

    for m in _TOKEN.finditer(text):
        tok, weight, at = m.group(0), m.group(1), m.start()
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])  # "\\(" -> "(", a lone "\\" -> ""
        elif tok == "(":
            open_round.append((len(res), at))
        elif tok == "[":
            open_square.append((len(res), at))
        elif weight is not None:
            if not _NUMBER.fullmatch(weight) or not _is_float(weight):
                raise PromptError(f"prompt {_show(text, at)}: the weight {weight!r} at character {at} "
                                  "is not a number; write (text:1.2), or \\: for a literal colon")
            close(open_round, m.end() - 1, ")", "(", float(weight))
        elif tok == ")":
            close(open_round, at, ")", "(", ROUND)
        elif tok == "]":
            close(open_square, at, "]", "[", SQUARE)
        else:  # plain text, which may hold BREAKs
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for stack, char, closer in ((open_round, "(", ")"), (open_square, "[", "]")):
        if stack:
            at = stack[-1][1]
            raise PromptError(f"prompt {_show(text, at)}: {char!r} at character {at} is never closed; "
                              f"add {closer!r} or write \\{char} for a literal {char}")
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for piece in res[1:]:  # merge runs of identical weights (A1111 compares floats exactly)
        if piece[1] == merged[-1][1] and tuple(piece) != BREAK and tuple(merged[-1]) != BREAK:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# --- 2. chunk: pieces -> token windows of 77 with per-token weights -----------------------------


@dataclass(frozen=True)
class Chunk:
    """One window of the text encoder: BOS, up to 75 tokens, EOS, then the tokenizer's padding (EOS for
    SD 1.x, 0 for SD 2.x, as A1111 pads after the first EOS); weight 1 off the text."""

    ids: tuple[int, ...]  # (77,)
    weights: tuple[float, ...]  # (77,)


def chunk(prompt: str, tokenizer, *, weighting: bool = True,
          comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A1111's tokenize_line: one prompt -> its chunks (at least one; "" is BOS, EOS and 75 pads).

    Each parsed piece is tokenized on its own. A chunk closes at 75 tokens or at BREAK; when
    one is full and a comma lies within `comma_backtrack` tokens of its end, the tokens after
    that comma move to the next chunk. A multi-vector embedding is never split between chunks.
    weighting=False reads brackets as plain text (A1111's emphasis "None").
    """
    n = tokenizer.max_length - 2  # 75
    bos, eos, comma = tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab[",</w>"]
    pad_id = getattr(tokenizer, "pad_id", eos)
    groups = {ids[0]: ids for ids in getattr(tokenizer, "added_words", {}).values() if len(ids) > 1}
    pieces = parse(prompt) if weighting else [(prompt, 1.0)]
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal ids, weights, last_comma
        pad = n - len(ids)
        chunks.append(Chunk((bos, *ids, eos, *[pad_id] * pad), (1.0, *weights, *[1.0] * pad, 1.0)))
        ids, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if (text, weight) == BREAK:
            next_chunk()
            continue
        tokens = tokenizer.encode(text)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == n and last_comma != -1 and n - last_comma <= comma_backtrack:
                cut = last_comma + 1  # the tail after the comma moves on
                tail_ids, tail_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                next_chunk()
                ids, weights = tail_ids, tail_weights
            if len(ids) == n:
                next_chunk()
            group = groups.get(token)
            k = len(group) if group and tuple(tokens[pos:pos + len(group)]) == group else 1
            if k > 1 and len(ids) + k > n:  # keep an embedding's vectors together
                next_chunk()
            ids += tokens[pos:pos + k]
            weights += [weight] * k
            pos += k
    if ids or not chunks:
        next_chunk()
    return chunks


def tokenize(prompts: str | Sequence[str], tokenizer, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids LongTensor (B, n, 77) and weights (B, n, 77); n = the most chunks any
    prompt needs, shorter prompts padded with empty-prompt chunks (weight 1). kwargs: chunk's."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts=[] must hold at least one prompt")
    per_prompt = [chunk(p, tokenizer, **kwargs) for p in prompts]
    empty = chunk("", tokenizer, weighting=False)[0]
    n = max(len(c) for c in per_prompt)
    per_prompt = [c + [empty] * (n - len(c)) for c in per_prompt]
    ids = torch.tensor([[c.ids for c in cs] for cs in per_prompt], dtype=torch.long)  # (B, n, 77)
    weights = torch.tensor([[c.weights for c in cs] for cs in per_prompt])  # (B, n, 77)
    return ids, weights


# --- 3-5. encode: chunks -> CLIP (with CLIP skip) -> weights -> one long context --------------


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on chunks z (N, 77, C) with weights (N, 77): scale each token's
    hidden state by its weight, then rescale each chunk so its mean is what it was."""
    mean_before = z.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    z = z * weights.to(z.dtype)[..., None]  # (N, 77, C)
    return z * (mean_before / z.mean(dim=(1, 2), keepdim=True))


def encode(prompts: str | Sequence[str], tokenizer, text_encoder, *, clip_skip: int = 1,
           weighting: bool = True, comma_backtrack: int = COMMA_BACKTRACK) -> torch.Tensor:
    """Prompts -> context (B, 77 n, C): A1111's weighted, chunked prompt encoding.

    clip_skip counts as A1111's "Clip skip" does: 1 is the last layer (SD 1.x), N takes
    hidden_states[-N] then the final layer norm; it is text_encoder(ids, clip_skip=N - 1) and
    diffusers' encode_prompt(clip_skip=N - 1). A prompt of at most 75 tokens without brackets
    gives exactly the plain path's text_encoder(tokenizer(prompt)).
    """
    L = text_encoder.config.num_hidden_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= L:
        raise ValueError(f"clip_skip={clip_skip!r} must be an int in [1, {L}] "
                         "(A1111's count: 1 = the last layer, 2 = the one before)")
    ids, weights = tokenize(prompts, tokenizer, weighting=weighting, comma_backtrack=comma_backtrack)
    B = ids.shape[0]
    device = next(text_encoder.parameters()).device  # CLIP (SD 1.x) or OpenCLIP (SD 2.x)
    flat = rearrange(ids, "b n t -> (b n) t").to(device)  # every chunk is a prompt of its own
    z = text_encoder(flat, clip_skip=clip_skip - 1)  # (B n, 77, C)
    z = apply_weights(z, rearrange(weights, "b n t -> (b n) t").to(device))
    return rearrange(z, "(b n) t c -> b (n t) c", b=B)  # (B, 77 n, C)


# --- textual inversion: embedding files -> new tokens ----------------------------------------


@dataclass(frozen=True)
class Embedding:
    """A loaded textual-inversion embedding: the prompt word and what it became."""

    name: str  # the prompt word
    tokens: tuple[str, ...]  # name, name_1, ..., one per vector
    ids: tuple[int, ...]  # their token ids
    vectors: torch.Tensor  # (n, C) float32, as read from the file
    path: Path


def _vectors_of(path: Path, data: dict) -> tuple[str | None, object]:
    """(the name the format implies, or None for the file stem; the raw vectors)."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict):  # a pickled nn.ParameterDict (torch 1.11 era): ldm's
            state = getattr(params, "state", None)  # unpickler gives an inert stand-in holding its state
            params = state.get("_parameters", params) if isinstance(state, dict) else params
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor (A1111 uses '*'); "
                                 f"got {type(params).__name__} with {len(params) if isinstance(params, dict) else '?'}")
        return None, next(iter(params.values()))
    if "clip_l" in data or "clip_g" in data:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l / clip_g); expected an SD 1.x one "
                             "(string_to_param, emb_params, or one diffusers token)")
    if set(data) == {"emb_params"}:  # A1111 / kohya .safetensors
        return None, data["emb_params"]
    if len(data) == 1:  # diffusers learned_embeds: {"<token>": vectors}
        key, value = next(iter(data.items()))
        return str(key), value
    raise EmbeddingError(f"{path}: not a textual-inversion embedding: keys {sorted(map(str, data))[:8]}; "
                         "expected string_to_param (A1111 .pt), emb_params, or one diffusers token")


def read_embedding(path: str | Path, name: str | None = None) -> tuple[str, torch.Tensor]:
    """An embedding file -> (prompt word, vectors (n, C) float32). Reads only: nothing is added."""
    path = Path(path)
    try:
        data, _ = checkpoint._read_file(path)  # safetensors, or torch zip through the safe unpickler
    except checkpoint.CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    implied, vectors = _vectors_of(path, data)
    word = name if name is not None else (implied if implied is not None else path.stem)
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(f"{path}: the embedding is a {type(vectors).__name__}; expected a tensor (n, C)")
    if vectors.dim() == 1:
        vectors = vectors[None]  # one vector (C,) -> (1, C)
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= 75:
        raise EmbeddingError(f"{path}: the embedding has shape {tuple(vectors.shape)}; expected (n, C) "
                             "with 1 <= n <= 75 vectors (a prompt chunk holds 75 tokens)")
    if not vectors.is_floating_point():
        raise EmbeddingError(f"{path}: the embedding holds {vectors.dtype} values; expected floating-point numbers")
    vectors = vectors.float().clone()  # off the file's memory map
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the embedding holds NaN or infinite values; expected finite numbers")
    return word, vectors


def load_embedding(path: str | Path, tokenizer, text_encoder, name: str | None = None) -> Embedding:
    """Add the embedding in `path` to `tokenizer` and `text_encoder`, as the word `name`.

    All checks run before either is changed (width, values, free token names), so a refused
    file leaves both as they were.
    """
    path = Path(path)
    word, vectors = read_embedding(path, name)
    C = text_encoder.config.hidden_size
    if vectors.shape[1] != C:
        raise EmbeddingError(f"{path}: the embedding is {vectors.shape[1]} wide ({vectors.shape[0]} vectors); "
                             f"this text encoder is {C} wide (SD 1.x: 768, SD 2.x: 1024)")
    if tokenizer.vocab_size != text_encoder.config.vocab_size:
        raise EmbeddingError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the text encoder "
                             f"{text_encoder.config.vocab_size} rows; new ids would not line up")
    tokens = [word] + [f"{word}_{i}" for i in range(1, vectors.shape[0])]
    try:
        ids = tokenizer.add_tokens(tokens, group=True)  # checks every name before adding any
    except (TypeError, ValueError) as e:
        raise EmbeddingError(f"{path}: {e} (pass name= to choose the prompt word)") from None
    rows = text_encoder.add_embeddings(vectors)  # shape and dtype checked above: cannot fail
    assert rows == ids, (rows, ids)
    return Embedding(word, tuple(tokens), tuple(ids), vectors, path)
