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

Bounds (A1111 has none): a prompt holds at most MAX_PROMPT_CHARS characters, MAX_CHUNKS chunks
(2,400 tokens) and MAX_DEPTH open brackets, and every piece's weight is finite with |w| <=
MAX_WEIGHT ("(x:99...9)" with 400 nines or 80 nested "(" give inf or 2048, which would ruin the
image silently or fail later as NaNs). Past a bound, PromptError names the prompt, the place and the limit, before
any tensor is made. The parser is linear: each group's multiplier is found first (a "(x:w)"
weight stands at its closing bracket), then each piece is multiplied by the multipliers of the
groups open around it, in the order A1111 applies them (the first to close first), so the floats
equal A1111's bit for bit.

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
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange

from ldm import checkpoint
from ldm.checkpoint.errors import printable
from ldm.tokenizer import MAX_NAME_CHARS, MAX_RUN_CHARS

__all__ = ["BREAK", "PromptError", "EmbeddingError", "Chunk", "Embedding", "parse", "chunk",
           "tokenize", "apply_weights", "encode", "read_embedding", "load_embedding"]

BREAK = ("BREAK", -1.0)  # the marker parse() puts where "BREAK" starts a new chunk (A1111's)
ROUND, SQUARE = 1.1, 1 / 1.1  # "(x)" and "[x]" multipliers
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# Bounds A1111 does not have; each keeps one prompt's work and memory small (see the docstring).
MAX_PROMPT_CHARS = MAX_RUN_CHARS  # 65,536; 32 chunks of English are ~12,000 characters, and the
# tokenizer reads a text this long exactly as the reference does (its one lossy cut is past it)
MAX_CHUNKS = 32  # 32 x 75 = 2,400 tokens, (1, 2464, C) of context; the longest prompts shared are ~10 chunks
MAX_DEPTH = 100  # brackets open at once; ((((x)))) is already strong emphasis
MAX_WEIGHT = 1000.0  # |weight| of any piece: 1.5 is strong, 1000 x a hidden state is far from overflow


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


_short = reprlib.Repr()  # repr for error lines: a long value is cut, so the message stays one short line
_short.maxstring = _short.maxother = 40


def _quote(text: str, limit: int = 60) -> str:
    """repr(text) cut to about `limit` characters: one line, whatever the text holds."""
    shown = repr(text[:limit])
    if len(shown) > limit + 2:  # escapes (control characters, emoji) made it long: cut the repr
        return shown[:limit + 1] + "..."
    return shown + ("..." if len(text) > limit else "")


def _kind(obj) -> str:
    """An object's type name for an error line (a pickle can name a class anything)."""
    name = type(obj).__name__
    return name if name.isidentifier() and len(name) <= 60 else _quote(name, 40)


def _show(text: str, at: int) -> str:
    """The prompt for an error line: whole if short, else the 60 characters around `at`."""
    if len(text) <= 100 and len(repr(text)) <= 120:
        return repr(text)
    a = max(0, at - 30)
    return f"{'...' if a else ''}{_quote(text[a:], 60)}"


def _check_prompt(text) -> None:
    """A prompt must be a str of at most MAX_PROMPT_CHARS characters."""
    if not isinstance(text, str):
        raise TypeError(f"prompt={_short.repr(text)} must be a str (got {_kind(text)})")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt {_show(text, 0)} has {len(text):,} characters; at most "
                          f"{MAX_PROMPT_CHARS:,} (ldm.prompt.MAX_PROMPT_CHARS) are read")


def _groups(text: str, tokens: list[re.Match]) -> dict[int, tuple[int, float]]:
    """Match the brackets: {index of an opening token: (index of its closing token, multiplier)}.

    Round and square brackets pair separately, as A1111 pairs them ("([a)]" is allowed).
    Raises PromptError at the first bracket that is unbalanced, nested deeper than MAX_DEPTH,
    or closes with a weight that is not a number in [-MAX_WEIGHT, MAX_WEIGHT].
    """
    groups: dict[int, tuple[int, float]] = {}
    open_round: list[tuple[int, int]] = []  # (token index, character) of each open "("
    open_square: list[tuple[int, int]] = []

    def close(stack, k: int, at: int, char: str, opener: str, factor: float) -> None:
        if not stack:
            raise PromptError(f"prompt {_show(text, at)}: {char!r} at character {at} closes no "
                              f"{opener!r}; write \\{char} for a literal {char}")
        groups[stack.pop()[0]] = (k, factor)

    for k, m in enumerate(tokens):
        tok, weight, at = m.group(0), m.group(1), m.start()
        if tok in ("(", "["):
            (open_round if tok == "(" else open_square).append((k, at))
            if len(open_round) + len(open_square) > MAX_DEPTH:
                raise PromptError(f"prompt {_show(text, at)}: {tok!r} at character {at} opens more than "
                                  f"{MAX_DEPTH} brackets at once (ldm.prompt.MAX_DEPTH)")
        elif weight is not None:
            if not _NUMBER.fullmatch(weight) or not _is_float(weight):
                raise PromptError(f"prompt {_show(text, at)}: the weight {_short.repr(weight)} at character {at} "
                                  "is not a number; write (text:1.2), or \\: for a literal colon")
            if not abs(float(weight)) <= MAX_WEIGHT:  # also catches inf ("(x:999...9)" of 400 digits)
                raise PromptError(f"prompt {_show(text, at)}: the weight {_short.repr(weight)} at character {at} "
                                  f"is out of range; allowed: -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                                  "(ldm.prompt.MAX_WEIGHT)")
            close(open_round, k, m.end() - 1, ")", "(", float(weight))
        elif tok == ")":
            close(open_round, k, at, ")", "(", ROUND)
        elif tok == "]":
            close(open_square, k, at, "]", "[", SQUARE)
    for stack, char, closer in ((open_round, "(", ")"), (open_square, "[", "]")):
        if stack:
            at = stack[-1][1]
            raise PromptError(f"prompt {_show(text, at)}: {char!r} at character {at} is never closed; "
                              f"add {closer!r} or write \\{char} for a literal {char}")
    return groups


def parse(text: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention: text -> [(text, weight), ...], BREAK markers in between.

    Runs of equal weight are merged, so "an (important) word" ->
    [("an ", 1.0), ("important", 1.1), (" word", 1.0)]. Unbalanced brackets, weights that
    are not numbers and anything past the bounds (module docstring) raise PromptError.
    """
    _check_prompt(text)
    tokens = list(_TOKEN.finditer(text))
    groups = _groups(text, tokens)
    opener_of = {closer: opener for opener, (closer, _) in groups.items()}
    res: list[list] = []  # [text, weight]; BREAK pieces are [*BREAK] and are never weighted
    open_groups: dict[int, tuple[int, float]] = {}  # opener -> (closer, multiplier), for groups open now
    weight: float | None = 1.0  # the product for open_groups; None when it must be recomputed

    def emit(piece: str, at: int) -> None:
        nonlocal weight
        if weight is None:  # A1111 multiplies a piece at each group's close: the first to close first
            weight = 1.0
            for _, factor in sorted(open_groups.values()):
                weight *= factor
        if not abs(weight) <= MAX_WEIGHT:
            raise PromptError(f"prompt {_show(text, at)}: the text at character {at} has weight {weight:.4g}, "
                              f"the product of its brackets; allowed: -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                              "(ldm.prompt.MAX_WEIGHT)")
        res.append([piece, weight])

    for k, m in enumerate(tokens):
        tok, at = m.group(0), m.start()
        if k in groups:  # an opening bracket
            open_groups[k] = groups[k]
            weight = None
        elif k in opener_of:  # a closing one: its group ends
            del open_groups[opener_of[k]]
            weight = None
        elif tok.startswith("\\"):
            emit(tok[1:], at)  # "\\(" -> "(", a lone "\\" -> ""
        else:  # plain text, which may hold BREAKs
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(list(BREAK))
                emit(part, at)
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
    weighting=False reads brackets as plain text (A1111's emphasis "None"). More than
    MAX_CHUNKS chunks raise PromptError.
    """
    n = tokenizer.max_length - 2  # 75
    bos, eos, comma = tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab[",</w>"]
    pad_id = getattr(tokenizer, "pad_id", eos)
    groups = {ids[0]: ids for ids in getattr(tokenizer, "added_words", {}).values() if len(ids) > 1}
    _check_prompt(prompt)
    pieces = parse(prompt) if weighting else [(prompt, 1.0)]
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal ids, weights, last_comma
        if len(chunks) == MAX_CHUNKS:  # refused before the ids of a huge prompt are gathered
            raise PromptError(f"prompt {_show(prompt, 0)} needs more than {MAX_CHUNKS} chunks of {n} tokens "
                              f"(each BREAK starts one); at most {MAX_CHUNKS} (ldm.prompt.MAX_CHUNKS)")
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


MAX_WIDTH = 4096  # the widest text encoder SD uses is OpenCLIP ViT-bigG's 1280


def _file(path: Path) -> str:
    """A file's name for an error line: as is, or quoted if it holds control characters."""
    return str(path) if str(path).isprintable() else _quote(str(path), 200)


def _vectors_of(where: str, data: dict) -> tuple[str | None, object]:
    """(the name the format implies, or None for the file stem; the raw vectors)."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict):  # a pickled nn.ParameterDict (torch 1.11 era): ldm's
            state = getattr(params, "state", None)  # unpickler gives an inert stand-in holding its state
            params = state.get("_parameters", params) if isinstance(state, dict) else params
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{where}: string_to_param must hold exactly one tensor (A1111 uses '*'); "
                                 f"got {_kind(params)} with {len(params) if isinstance(params, dict) else '?'}")
        return None, next(iter(params.values()))
    if "clip_l" in data or "clip_g" in data:
        raise EmbeddingError(f"{where}: an SDXL embedding (clip_l / clip_g); expected an SD 1.x one "
                             "(string_to_param, emb_params, or one diffusers token)")
    if set(data) == {"emb_params"}:  # A1111 / kohya .safetensors
        return None, data["emb_params"]
    if len(data) == 1:  # diffusers learned_embeds: {"<token>": vectors}
        key, value = next(iter(data.items()))
        if not isinstance(key, str):
            raise EmbeddingError(f"{where}: the one key is {_short.repr(key)} ({_kind(key)}); expected "
                                 "the token as a str (diffusers learned_embeds)")
        return key, value
    keys = sorted(map(str, data))
    shown = ", ".join(_quote(k, 16) for k in keys[:4]) + (f", ... {len(keys) - 4} more" if len(keys) > 4 else "")
    raise EmbeddingError(f"{where}: not a textual-inversion embedding: keys [{shown}]; "
                         "expected string_to_param (A1111 .pt), emb_params, or one diffusers token")


def read_embedding(path: str | Path, name: str | None = None) -> tuple[str, torch.Tensor]:
    """An embedding file -> (prompt word, vectors (n, C) float32). Reads only: nothing is added."""
    path = Path(path)
    where = _file(path)
    try:
        data, _ = checkpoint._read_file(path)  # safetensors, or torch zip through the safe unpickler
    except checkpoint.CheckpointError as e:
        # the reader names the file with its control characters escaped (checkpoint.errors.printable)
        message = str(e).replace(printable(str(path)), where, 1)
        raise EmbeddingError(message if message.isprintable() else _quote(message, 300)) from None
    implied, vectors = _vectors_of(where, data)
    word = name if name is not None else (implied if implied is not None else path.stem)
    if not isinstance(word, str) or len(word) > MAX_NAME_CHARS:  # before 75 copies of it are made
        raise EmbeddingError(f"{where}: the prompt word {_short.repr(word)} must be a str of at most "
                             f"{MAX_NAME_CHARS} characters (pass name= to choose it)")
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(f"{where}: the embedding is a {_kind(vectors)}; expected a tensor (n, C)")
    if vectors.dim() == 1:
        vectors = vectors[None]  # one vector (C,) -> (1, C)
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= 75 or not 1 <= vectors.shape[1] <= MAX_WIDTH:
        raise EmbeddingError(f"{where}: the embedding has shape {tuple(vectors.shape)}; expected (n, C) "
                             f"with 1 <= n <= 75 vectors (a prompt chunk holds 75 tokens) and 1 <= C <= {MAX_WIDTH}")
    if not vectors.is_floating_point():
        raise EmbeddingError(f"{where}: the embedding holds {vectors.dtype} values; expected floating-point numbers")
    vectors = vectors.float().clone()  # off the file's memory map
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{where}: the embedding holds NaN or infinite values; expected finite numbers")
    return word, vectors


def load_embedding(path: str | Path, tokenizer, text_encoder, name: str | None = None) -> Embedding:
    """Add the embedding in `path` to `tokenizer` and `text_encoder`, as the word `name`.

    All checks run before either is changed (width, values, free token names), so a refused
    file leaves both as they were.
    """
    path = Path(path)
    where = _file(path)
    word, vectors = read_embedding(path, name)
    C = text_encoder.config.hidden_size
    if vectors.shape[1] != C:
        raise EmbeddingError(f"{where}: the embedding is {vectors.shape[1]} wide ({vectors.shape[0]} vectors); "
                             f"this text encoder is {C} wide (SD 1.x: 768, SD 2.x: 1024)")
    if tokenizer.vocab_size != text_encoder.config.vocab_size:
        raise EmbeddingError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the text encoder "
                             f"{text_encoder.config.vocab_size} rows; new ids would not line up")
    tokens = [word] + [f"{word}_{i}" for i in range(1, vectors.shape[0])]
    try:
        ids = tokenizer.add_tokens(tokens, group=True)  # checks every name before adding any
    except (TypeError, ValueError) as e:
        raise EmbeddingError(f"{where}: {e} (pass name= to choose the prompt word)") from None
    rows = text_encoder.add_embeddings(vectors)  # shape and dtype checked above: cannot fail
    assert rows == ids, (rows, ids)
    return Embedding(word, tuple(tokens), tuple(ids), vectors, path)
