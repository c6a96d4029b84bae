"""The CLIP tokenizer, written by hand: a prompt -> token ids (B, 77) for the text encoder.

Stable Diffusion 1.x reads a prompt through OpenAI's CLIP byte-level BPE. The steps, in order:

    "A  Café\tphoto!"
      1. specials   cut out literal "<|startoftext|>" / "<|endoftext|>" (exact case) as ids
      2. normalize  NFC, every whitespace run -> " ", lower-case       "a café photo!"
      3. split      words by CLIP's pattern, whitespace dropped        ["a", "café", "photo", "!"]
      4. bytes      each word's UTF-8 bytes -> 256 printable chars     "cafÃ©"
      5. BPE        merge adjacent symbols by merge rank, last one
                    marked "</w>" (end of word)                        "cafÃ©</w>"
      6. ids        look the pieces up in the vocab                    [320, 15304, 1125, 256]
      7. window     BOS + first 75 ids + EOS, padded with EOS to 77    (B, 77) int64
                    (SD 2.x's OpenCLIP pads with 0 instead: pad_id=0)

Parity. The reference is transformers' `CLIPTokenizer` (5.x; 4.x's "fast" class did the same),
backed by the Rust `tokenizers` library, whose normalizer is `NFC -> Replace(\\s+, " ") -> Lowercase`:
no ftfy and no HTML unescaping, which OpenAI's `simple_tokenizer` does, so mojibake ("cafÃ©") and
entities ("&amp;") tokenize differently from OpenAI's original, in the reference and here alike.
Three details of the Rust implementation matter (OpenAI's original differs on all three):

- "whitespace" is Oniguruma's `\\s`: tab..carriage return, U+0085 and the categories Zs, Zl, Zp
  (Python's `str.isspace` also counts U+001C..U+001F; those are kept as odd tokens here);
- lower-casing is per character (Rust `char::to_lowercase`): "Σ" -> "σ" everywhere, never the
  final "ς" of Python's `str.lower()`; "İ" -> "i" + U+0307;
- a literal "<|endoftext|>" becomes the EOS id (the added-token pass runs before normalization);
  in another case ("<|EndOfText|>") it is text, split into "<|", "endoftext", "|>".

Character classes (letter L*, number N*) come from Python's `unicodedata` (Unicode 14.0 on 3.11);
the reference's are newer, so a character assigned since (e.g. U+13460..U+143FF, letters since
Unicode 16) can split differently; for the rest the ids agree (hypothesis-tested). A lone surrogate
(a str, not valid text; the reference refuses it) is spelled by its UTF-8-style bytes.

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT licence, vendored in ldm/data/): a
header line, then 262,144 merges ranked by line, of which CLIP keeps the first 48,894: 256 byte
symbols + 256 with "</w>" + 48,894 merged symbols + 2 specials = 49,408 ids; BOS = 49406, EOS =
49407, and SD 1.x pads with EOS (not 0). SD 2.x's OpenCLIP tokenizer is the same BPE but pads with
id 0 (the token "!", as open_clip.tokenize and diffusers' SD 2 do): `CLIPTokenizer(pad_id=0)`.

Added tokens (textual inversion, for ldm.prompt): `add_tokens(names)` gives new words ids from
49,408 up. As transformers' added tokens, they are cut out of the normalized text before the
split and BPE, case-insensitively, the longest name first, but only as whole words (a name "cat"
leaves "concat" alone, where transformers would split it). With `group=True` the first name
stands for all of them, so the prompt word of a multi-vector embedding becomes its n ids.

Long and hostile text: work per prompt is bounded, and the ids equal the reference's for every
prompt of practical length. BPE merges with a heap (`_bpe`): n log n in a word's length, not
OpenAI's quadratic loop, with the same merges in the same order. The text is read in segments
(`SEGMENT_CHARS`) cut just before ASCII whitespace, which nothing crosses (NFC never composes
across a space, no word or special holds one, and an added name with a space turns the cuts off),
so `tok(prompt)` reads only the segments that hold its first 75 ids (plus `COUNT_PAST_WINDOW`, to
count the dropped ones). A stretch of over `MAX_RUN_CHARS` characters without ASCII whitespace is
cut anyway, the one place where ids can differ from the reference's: it is at least 256 tokens (a
BPE token spans at most 32 bytes, an added name 256 characters), far past the 75-token window,
unless it is other whitespace, where a cut changes nothing. `ldm.prompt` refuses longer prompts.

Reference: Radford et al. 2021 (CLIP); Sennrich et al. 2016 (BPE); Radford et al. 2019 (GPT-2,
byte-level BPE). Parity with `transformers.CLIPTokenizer` is tested in tests/test_tokenizer.py.
"""
from __future__ import annotations

import functools
import gzip
import heapq
import itertools
import re
import reprlib
import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["CLIPTokenizer", "TruncationWarning", "bytes_to_unicode", "is_space", "normalize", "split_words",
           "DEFAULT_VOCAB_PATH"]

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 48894  # 49408 - 256 - 256 - 2: the merges CLIP keeps from the file
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # in the pattern's order

# Bounds on the work one prompt can cause (see "Long and hostile text" in the module docstring).
SEGMENT_CHARS = 4096  # text is read in segments of about this many characters, cut before whitespace
MAX_RUN_CHARS = 65536  # a stretch without ASCII whitespace is cut after this many characters
CACHE_WORD_CHARS = 256  # words up to this long are cached (transformers' BPE cache has the same bound)
MAX_NAME_CHARS = 256  # an added token's name (file names are at most 255 bytes)
COUNT_PAST_WINDOW = 1000  # the truncation warning counts this many dropped tokens, then says "more than"
_SOFT_CUT = re.compile(r"[ \t\n\r\x0b\x0c]+")  # ASCII whitespace: NFC never joins characters across it
_SPECIALS = re.compile(f"{re.escape(BOS)}|{re.escape(EOS)}")
_short = reprlib.Repr()  # repr for error lines: long values cut, so a message stays one short line
_short.maxstring = _short.maxother = 80


class TruncationWarning(UserWarning):
    """A prompt had more BPE tokens than fit between BOS and EOS; the tail was dropped."""


# --- 2. normalize ----------------------------------------------------------------------------


def is_space(ch: str) -> bool:
    """Oniguruma's Unicode `\\s`: \\t \\n \\v \\f \\r, U+0085, and categories Zs, Zl, Zp."""
    return ch in "\t\n\v\f\r\x85" or unicodedata.category(ch) in ("Zs", "Zl", "Zp")


def normalize(text: str) -> str:
    """NFC, every whitespace run -> one space, then lower-case character by character.

    Not stripped: leading/trailing spaces vanish at the split. Per-character lower-casing
    (not `str.lower()`) keeps "Σ" -> "σ" at the end of a word, as the reference does.
    """
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for ch in text:
        if is_space(ch):
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch)
            in_space = False
    return "".join(ch.lower() for ch in out)


# --- 3. split into words ---------------------------------------------------------------------


def _char_class(ch: str) -> str:
    """"s" whitespace, "L" letter (category L*), "N" number (category N*), "P" anything else."""
    if is_space(ch):
        return "s"
    return {"L": "L", "N": "N"}.get(unicodedata.category(ch)[0], "P")


def split_words(text: str) -> list[str]:
    """Split normalized text into the words BPE sees, dropping whitespace.

    A hand-written scanner for CLIP's pattern (first alternative that matches wins):

        <|startoftext|> | <|endoftext|> | 's | 't | 're | 've | 'm | 'll | 'd
        | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+

    so letters group into runs, every digit stands alone, and other characters (punctuation,
    symbols, emoji) group into runs. A special-token string reaching this point (it was in
    another case) is split again by the reference's byte-level pre-tokenizer into "<|", the
    letters and "|>"; that second split changes nothing else.
    """
    words, i, n = [], 0, len(text)
    while i < n:
        kind = _char_class(text[i])
        if kind == "s":
            i += 1
            continue
        special = next((s for s in (BOS, EOS) if text.startswith(s, i)), None)
        if special is not None:
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
            continue
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            j = i + len(contraction)
        elif kind == "N":
            j = i + 1
        else:  # a run of letters, or a run of "other" characters
            j = i + 1
            while j < n and _char_class(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


# --- 4. bytes: the 256 byte values as printable characters --------------------------------


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte 0..255 to a printable character.

    Printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") map to themselves; the other 68
    (controls, space, soft hyphen) map to U+0100.. in order. BPE then works on strings of
    printable characters, and any UTF-8 text has a spelling: no unknown tokens.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # this order (printable bytes first) is also the order of ids 0..255 in the vocab
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


# --- the tokenizer ---------------------------------------------------------------------------


def _load_merges(path: Path) -> list[tuple[str, str]]:
    """Read the merges file (.txt or .txt.gz): a header line, then one 'a b' merge per line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(
            f"path={str(path)!r} is not a CLIP BPE merges file: expected a header line and "
            f">= {NUM_MERGES} lines 'a b', got {len(merges)} lines ({len(bad)} malformed)")
    return merges


class CLIPTokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer, ids equal to transformers' `CLIPTokenizer`.

    `tok(prompts)` -> LongTensor (B, 77): BOS, at most 75 BPE ids, EOS, then EOS padding
    (`CLIPTokenizer(pad_id=0)`: zeros, SD 2.x).
    `encode` / `tokenize` give the BPE ids / pieces of one text without BOS/EOS; `decode`
    turns ids back into text for inspection.
    """

    def __init__(self, path: str | Path | None = None, max_length: int = 77, pad_id: int | None = None):
        """pad_id: the id that fills the window after EOS; None = EOS (SD 1.x), 0 for SD 2.x."""
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={_short.repr(max_length)} must be an int >= 2 (room for BOS and EOS)")
        self.path = Path(path) if path is not None else DEFAULT_VOCAB_PATH
        if not self.path.is_file():
            raise FileNotFoundError(f"path={str(self.path)!r}: no such BPE vocab file")
        merges = _load_merges(self.path)
        # rank r = priority of merge r (lower merges first)
        self.bpe_ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        byte_chars = list(bytes_to_unicode().values())
        tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(tokens)}  # token -> id
        self.id_to_token: list[str] = tokens
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
        self.vocab_size = len(tokens)
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)
                                   or not 0 <= pad_id < self.vocab_size):
            raise ValueError(f"pad_id={_short.repr(pad_id)} must be None (pad with EOS, SD 1.x) or an id in "
                             f"[0, {self.vocab_size}) (0 for SD 2.x)")
        self.pad_id = self.eos_id if pad_id is None else pad_id  # SD 1.x pads with EOS, SD 2.x with 0
        self.max_length = max_length  # T: BOS + (max_length - 2) BPE ids + EOS
        self._bpe_cached = functools.lru_cache(maxsize=1 << 14)(self._bpe)  # words <= CACHE_WORD_CHARS
        # added tokens (textual inversion): normalized word -> the ids it stands for
        self.base_vocab_size = self.vocab_size
        self.added_words: dict[str, tuple[int, ...]] = {}
        self._added_re: re.Pattern | None = None
        self._added_longest_first: list[str] = []
        self._spaced_names = False  # an added name holds a space: text is not cut at whitespace

    def __repr__(self) -> str:
        pad = "" if self.pad_id == self.eos_id else f", pad_id={self.pad_id}"
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}{pad}, "
                f"path={str(self.path)!r})")

    # -- 5. byte-pair encoding of one word --

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge a word's byte symbols, lowest-ranked adjacent pair first, until none applies.

        OpenAI's loop (merge every occurrence of the best pair, then look for the next) is quadratic
        in the word's length: a 20,000-letter word took 20 s. This is the heap of `tokenizers`
        (word.rs `merge_all`): pairs keyed (rank, position), so the lowest rank merges first and,
        among equal ranks, the leftmost; an entry whose symbols changed since it was pushed is
        stale and skipped. A merge pushes at most two pairs: O(n log n) for n bytes. OpenAI's order
        gives the same pieces: each symbol of the file is made by one merge, and every merge that
        uses it comes later, so a merge never creates a pair of lower rank than its own.
        """
        # surrogatepass: a lone surrogate (not valid text, but a valid str) still gets bytes
        symbols: list[str | None] = [self.byte_encoder[b] for b in word.encode("utf-8", errors="surrogatepass")]
        symbols[-1] += "</w>"  # the last symbol carries the end-of-word mark
        n = len(symbols)
        right = [*range(1, n), -1]  # a linked list over the live symbols: neighbour indices, -1 at the ends
        left = list(range(-1, n - 1))
        ranks = self.bpe_ranks
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = right[i]
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one of the two was merged into something else meanwhile
            symbols[i] += symbols[j]  # i absorbs its right neighbour j
            symbols[j], k = None, right[j]
            right[i] = k
            if k >= 0:
                left[k] = i
            for a, b in ((left[i], i), (i, k)):  # the two pairs the new symbol is part of
                if a >= 0 and b >= 0 and (r := ranks.get((symbols[a], symbols[b]))) is not None:
                    heapq.heappush(heap, (r, a))
        return tuple(s for s in symbols if s is not None)

    def _bpe_word(self, word: str) -> tuple[str, ...]:
        """BPE through the cache for ordinary words; a long one is computed, not kept in memory."""
        return self._bpe_cached(word) if len(word) <= CACHE_WORD_CHARS else self._bpe(word)

    def bpe(self, word: str) -> list[str]:
        """The BPE pieces of one word (already normalized and split), e.g. 'astronaut'."""
        if not isinstance(word, str) or not word:
            raise ValueError(f"word={_short.repr(word)} must be a non-empty str")
        return list(self._bpe_word(word))

    # -- added tokens: new whole words with ids from base_vocab_size upward --

    def add_tokens(self, names: Sequence[str], *, group: bool = False) -> list[int]:
        """Add `names` as new tokens; returns their ids (vocab_size, vocab_size + 1, ...).

        A name matches in a prompt after normalization (case-insensitively), as a whole word,
        before BPE. With group=True the first name stands for all of them in order (a 3-vector
        embedding "tok" is added as ["tok", "tok_1", "tok_2"]: "tok" gives all 3 ids), and each
        further name still matches alone. Nothing is added if any name is refused (empty,
        repeated, already a token, longer than MAX_NAME_CHARS, or holding control characters).
        """
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise TypeError(f"names={_short.repr(names)} must be a non-empty list of str")
        words = []
        for name in names:
            shown = _short.repr(name)
            if isinstance(name, str) and (len(name) > MAX_NAME_CHARS or
                                          any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name)):
                raise ValueError(f"token name {shown} must be at most {MAX_NAME_CHARS} characters of "
                                 "printable text (no control characters or lone surrogates)")
            word = normalize(name).strip(" ") if isinstance(name, str) else ""
            if not word or word != normalize(name) or BOS in word or EOS in word:
                raise ValueError(f"token name {shown} must be a non-empty str without leading or "
                                 "trailing whitespace or special tokens")
            if word in self.vocab or word in self.added_words or word in words:
                also = "" if word == name else f" (as {_short.repr(word)})"
                raise ValueError(f"token name {shown} is already a token{also}; choose another name")
            words.append(word)
        ids = list(range(self.vocab_size, self.vocab_size + len(words)))
        for word, i in zip(words, ids):
            self.added_words[word] = (i,)
            self.id_to_token.append(word)
        if group:
            self.added_words[words[0]] = tuple(ids)
        self.vocab_size += len(words)
        self._added_longest_first = sorted(self.added_words, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, self._added_longest_first)))
        self._spaced_names = any(" " in w for w in self.added_words)
        return ids

    def _split_added(self, text: str) -> list[str | tuple[int, ...]]:
        """Normalized text -> pieces of text and, where an added word stands, its ids."""
        out: list[str | tuple[int, ...]] = []
        start = i = 0
        while self._added_re is not None and (m := self._added_re.search(text, i)) is not None:
            a = m.start()
            word = next((w for w in self._added_longest_first
                         if text.startswith(w, a) and _whole_word(text, a, a + len(w))), None)
            if word is None:  # inside a longer word: not this token
                i = a + 1
                continue
            out += [text[start:a], self.added_words[word]]
            start = i = a + len(word)
        return [*out, text[start:]]

    # -- 1-6: text -> pieces -> ids --

    def tokenize(self, text: str) -> list[str]:
        """Text -> BPE pieces (strings), without BOS/EOS. For inspection."""
        return [self.id_to_token[i] if isinstance(i, int) else i for i in self._pieces(text)]

    def _pieces(self, text: str) -> list[str | int]:
        """BPE pieces, with added tokens as their ids (they have no BPE spelling)."""
        _check_text(text, "text")
        return list(self._iter_pieces(text))

    def _iter_pieces(self, text: str):
        """The pieces of `text`, lazily: a caller that stops early leaves the rest unread."""
        start = 0
        for m in _SPECIALS.finditer(text):  # exact-case specials, cut out before normalization
            yield from self._text_pieces(text, start, m.start())
            yield m.group(0)
            start = m.end()
        yield from self._text_pieces(text, start, len(text))

    def _text_pieces(self, text: str, a: int, b: int):
        """The pieces of text[a:b] (no specials in it), one segment at a time."""
        for segment in self._segments(text, a, b):
            for part in self._split_added(normalize(segment)):
                if isinstance(part, tuple):  # an added word: its ids, no BPE
                    yield from part
                    continue
                for word in split_words(part):
                    yield from self._bpe_word(word)

    def _segments(self, text: str, a: int, b: int):
        """Cut text[a:b] into segments that tokenize as the whole does (module docstring, "Long
        and hostile text"): just before ASCII whitespace once a segment holds SEGMENT_CHARS
        characters, and after every MAX_RUN_CHARS characters of a longer run without it."""
        start = run = a  # the segment being gathered; the run without whitespace being read
        for m in itertools.chain(_SOFT_CUT.finditer(text, a, b), [None]):
            run_end = b if m is None else m.start()
            while run_end - run > MAX_RUN_CHARS:  # too long to read whole: the one lossy cut
                run += MAX_RUN_CHARS
                yield text[start:run]
                start = run
            if m is None:
                break
            if m.start() - start >= SEGMENT_CHARS and not self._spaced_names:
                yield text[start:m.start()]
                start = m.start()
            run = m.end()
        if start < b:
            yield text[start:b]

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without BOS/EOS and untruncated."""
        return [p if isinstance(p, int) else self.vocab[p] for p in self._pieces(text)]

    def _iter_ids(self, text: str):
        """`encode` as a generator: the caller takes as many ids as it needs, and no more is read."""
        _check_text(text, "text")
        return (p if isinstance(p, int) else self.vocab[p] for p in self._iter_pieces(text))

    def decode(self, ids) -> str | list[str]:
        """Ids -> text: specials and padding dropped, one space after each word.

        `ids`: a sequence of ints or a 1-D tensor -> str; a 2-D tensor (B, T) or a list of
        sequences -> list of B strings. Bytes that do not form valid UTF-8 (a piece cut from a
        multi-byte character) decode as U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2:
                return [self.decode(row) for row in ids]
            if ids.dim() != 1:
                raise ValueError(f"ids has shape {tuple(ids.shape)}; expected (T,) or (B, T)")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"ids={_short.repr(ids)} must be a list of ints or a 1-D/2-D tensor")
        if ids and all(isinstance(row, (list, tuple)) for row in ids):
            return [self.decode(row) for row in ids]
        if self.pad_id != self.eos_id and self.eos_id in ids:   # drop the padding after the last EOS
            last = len(ids) - 1 - ids[::-1].index(self.eos_id)
            if all(i == self.pad_id for i in ids[last + 1:]):
                ids = ids[:last + 1]
        out = bytearray()
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ids contains {_short.repr(i)}; allowed: ints in [0, {self.vocab_size})")
            if i in (self.bos_id, self.eos_id):
                continue
            token = self.id_to_token[i]
            if i >= self.base_vocab_size:  # an added token: its name, as a word
                out += (token + " ").encode("utf-8", errors="surrogatepass")
                continue
            end_of_word = token.endswith("</w>")
            out += bytes(self.byte_decoder[c] for c in (token[:-4] if end_of_word else token))
            if end_of_word:
                out += b" "
        return out.decode("utf-8", errors="replace").removesuffix(" ")

    # -- 7. the fixed window --

    def truncated_text(self, prompt: str) -> str:
        """The part of `prompt` that does not fit in the window (decoded), or '' if it fits."""
        ids = self.encode(prompt)
        return self.decode(ids[self.max_length - 2:])

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> LongTensor (B, max_length): BOS, ids, EOS, padding (EOS, or pad_id).

        A prompt longer than max_length - 2 = 75 BPE tokens keeps its first 75 and ends with
        EOS; a `TruncationWarning` says how many tokens were dropped (up to COUNT_PAST_WINDOW,
        then "more than") and what text they held. Only as much of a prompt is read as these
        need. A single string is a batch of one.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts={_short.repr(prompts)} must be a str or a non-empty list of str")
        for b, p in enumerate(prompts):
            _check_text(p, f"prompts[{b}]")
        keep = self.max_length - 2
        out = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)  # (B, T)
        for b, p in enumerate(prompts):
            counted = keep + COUNT_PAST_WINDOW  # read one id more, to know whether there are more
            ids = list(itertools.islice(self._iter_ids(p), counted + 1))
            if len(ids) > keep:
                dropped = ids[keep:counted]
                total, lost = ((f"more than {counted}", f"more than {len(dropped)}") if len(ids) > counted
                               else (len(ids), len(dropped)))
                warnings.warn(f"prompts[{b}] has {total} BPE tokens; CLIP reads {keep}, so {lost} were "
                              f"dropped: {_short.repr(self.decode(dropped))}", TruncationWarning, stacklevel=2)
                ids = ids[:keep]
            out[b, : len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        return out


def _whole_word(text: str, a: int, b: int) -> bool:
    """Is text[a:b] not part of a longer run of letters or digits?"""
    def glued(x: str, y: str) -> bool:  # two letters, or two digits
        return _char_class(x) == _char_class(y) in ("L", "N")

    return (a == 0 or not glued(text[a - 1], text[a])) and (b == len(text) or not glued(text[b - 1], text[b]))


def _check_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name}={_short.repr(text)} must be a str (got {type(text).__name__})")
