"""Write tests/data/tokenizer_corpus.txt: the prompts the tokenizer parity test runs.

    python tests/data/make_tokenizer_corpus.py

Each line after the '#' header is one prompt as a JSON string (so tabs, newlines and other
whitespace runs inside a prompt survive; non-ASCII is written as itself, readable). The
prompts are hand-written seeds plus seeded random combinations, grouped by what they exercise:
plain prompts, accents (NFC and NFD spellings), emoji (ZWJ sequences, skin tones, flags,
variation selectors), CJK and other scripts, punctuation and prompt syntax, numbers in many
scripts, whitespace runs, apostrophes and contractions, very long prompts (truncation),
special-token strings, and random code points from many Unicode blocks.
"""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tokenizer_corpus.txt"
SEED = 0

SUBJECTS = [
    "a photograph of an astronaut riding a horse", "a cat wearing a tiny hat", "portrait of an old fisherman",
    "a castle on a cliff at sunset", "an oil painting of a fox in the snow", "a bowl of ramen, studio lighting",
    "cyberpunk city street at night, neon signs", "a watercolor of a lighthouse", "a robot reading a book",
    "a dragon made of glass", "a cozy cabin in the woods", "a macro photo of a dew-covered spider web",
    "an isometric pixel-art village", "a samurai standing in the rain", "a teddy bear on a skateboard in times square",
    "a corgi astronaut floating in space", "still life with lemons and a silver jug", "a steampunk airship",
    "the interior of a gothic cathedral", "a koi pond seen from above", "a medieval map of a fantasy kingdom",
    "a bioluminescent forest", "a vintage car on route 66", "a stained glass window of an owl",
]
STYLES = [
    "highly detailed", "8k", "trending on artstation", "by greg rutkowski", "octane render", "unreal engine 5",
    "masterpiece", "best quality", "photorealistic", "cinematic lighting", "bokeh", "35mm film", "f/1.8",
    "hdr", "sharp focus", "concept art", "matte painting", "volumetric fog", "golden hour", "ultra-wide angle",
    "by alphonse mucha", "studio ghibli style", "low poly", "vaporwave", "ukiyo-e", "art nouveau",
]
ACCENTED = [
    "café", "crème brûlée", "naïve", "façade", "jalapeño", "smörgåsbord", "Zürich", "São Paulo", "Ærø",
    "Øresund", "Kraków", "Málaga", "Besançon", "El Niño", "piñata", "Mötley Crüe", "Straße", "GROẞE",
    "Đà Nẵng", "Phở bò", "Hồ Chí Minh", "Ångström", "Dvořák", "Škoda", "Łódź", "Ísafjörður", "Ça va",
    "résumé", "déjà vu", "Ελληνικά", "Ğ ğ İ ı", "İstanbul", "Čeština", "Eñe", "Österreich", "Ünlü",
]
EMOJI = [
    "🐶", "🐱", "🚀", "🌸", "🔥", "✨", "❤️", "❤", "👍🏽", "👩‍🚀", "🧑‍🎨", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇫🇷",
    "🇺🇸", "🙂", "😂", "🤖", "🦄", "🍣", "🌊", "☕", "⭐", "🎨", "🖼️", "📷", "🌕", "🌈", "🐉", "💀", "👀",
    "🏴‍☠️", "🧙🏻‍♂️", "✌🏿", "🫠", "🪐", "©", "™", "®", "♀️", "⚡",
]
CJK = [
    "宇宙飞行员骑马", "一只猫", "山水画", "富士山と桜", "東京の夜景", "猫が好きです", "カタカナ", "ひらがな",
    "서울의 밤", "한국어 프롬프트", "水墨画风格", "赛博朋克城市", "龍", "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "「引用」",
    "【高品质】", "（杰作）", "ラーメン、餃子", "漢字かな交じり文", "中文，标点。", "一二三四五六七八九十",
    "𠀀𠀁 (CJK extension B)", "ｶﾀｶﾅ half-width", "〜波ダッシュ〜",
]
SCRIPTS = [
    "Привет, мир", "Москва зимой", "Ωμέγα και Σίσυφος", "ΟΔΥΣΣΕΥΣ", "ὀδυσσεύς", "שלום עולם", "مرحبا بالعالم",
    "नमस्ते दुनिया", "ภาษาไทย", "ქართული", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ runes", "ⲕⲏⲙⲉ", "ትግርኛ", "தமிழ்", "বাংলা",
    "ꦗꦮ", "𝓯𝓪𝓷𝓬𝔂 𝓽𝓮𝔁𝓽", "𝕕𝕠𝕦𝕓𝕝𝕖 𝕤𝕥𝕣𝕦𝕔𝕜", "ＡＢＣ ｘｙｚ", "Ⓐⓑⓒ", "ﬁne ﬂour", "Ǆemal ǅ ǆ",
    "ΣΑΣ σας", "ΆΈΉ", "Ⅷ Ⅻ ⅷ", "İIıi", "ß ẞ", "ŉ", "ǰ", "Ꭰ ꭰ Cherokee",
]
PUNCT = [
    "(masterpiece:1.2)", "((best quality))", "[[low quality]]", "{blue|red} hair", "--ar 16:9 --v 5",
    "photo, 4k, hdr!!!", "what?!", "wait... what", "a—b – c", "“quoted”", "«guillemets»", "„Anführung“",
    "#hashtag @mention", "https://example.com/a?b=c&d=e", "user@example.com", "C++ & C#", "50% off",
    "$100 / €90 / £80 / ¥1000", "a/b\\c", "<lora:detail:0.8>", "<b>bold</b>", "&amp; &lt;tag&gt; &#39;",
    "~~strike~~", "**bold** _it_", "`code`", "a|b|c", "->", "=>", "::", "!!!!!!!!!!", "?!?!", "....",
    "…", "·•◦", "★☆", "§¶†‡", "°C", "±∞≈≠", "→←↑↓", "■□▲△", "♪♫", "¿Qué?", "¡Hola!", "½ + ¼",
    "a_b_c", "snake_case_prompt", "kebab-case-prompt", "CamelCasePrompt", "</w>", "a</w>b",
]
NUMBERS = [
    "0", "1", "42", "1234567890", "3.14159", "-7", "+1", "1e-5", "2024-05-09", "12:30", "1,000,000",
    "1st 2nd 3rd 4th", "24fps", "1080p", "4k", "16:9", "x²", "H₂O", "¹²³", "½ ⅓ ¾", "Ⅰ Ⅱ Ⅲ", "①②③",
    "٠١٢٣٤٥٦٧٨٩", "०१२३", "０１２３", "𝟎𝟏𝟐", "〇", "十万", "๑๒๓", "v1.5", "sd-1.4", "seed 1337",
    "cfg 7.5", "steps=50", "0x1F600", "#ff00aa", "3d", "2.5d", "007", "99%",
]
WHITESPACE = [
    "  leading spaces", "trailing spaces   ", "many     spaces", "tab\tseparated", "new\nline", "crlf\r\nline",
    "mixed \t \n  runs", "nbsp\u00a0here", "ideographic\u3000space", "thin\u2009space", "em\u2003space",
    "line\u2028separator", "para\u2029separator", "nel\u0085char", "zero\u200bwidth", "bom\ufeffmark",
    "vertical\x0btab", "form\x0cfeed", "unit\x1fseparator", "record\x1eseparator", "narrow\u202fnbsp",
    "ogham\u1680space", "\t\t", "   ", "\n", "mongolian\u180evowel", "zwj\u200djoiner", "zwnj\u200cnon",
    "word\u00adsoft-hyphen",
]
APOSTROPHES = [
    "don't", "DON'T", "it's", "IT'S", "we're", "they've", "I'm", "you'll", "he'd", "she'll've", "y'all",
    "rock'n'roll", "'s", "'t", "''", "'''", "o'clock", "the dog's bone", "the dogs' bones", "Mc'Donald's",
    "’s curly", "don’t", "l'été", "qu'est-ce", "'quoted'", "'S'T'RE'VE'M'LL'D", "can't won't shan't",
    "rock 'n' roll", "'90s", "it''s", "!'s", "a'sb", "'ss", "'dd", "'lll", "'mm", "'re'", "’’",
]
SPECIALS = [
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "x<|endoftext|>!", "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|>", "<|EndOfText|> dog", "!<|endoftext|>?", "<|endoftext|><|endoftext|>", "<|startoftext",
    "endoftext|>", "<| endoftext |>", "<|StartOfText|>!!", "<<|endoftext|>>", "a<|startoftext|>b<|endoftext|>c",
]
BLOCKS = [  # (start, end) code point ranges to sample random characters from
    (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x530, 0x58F), (0x590, 0x6FF),
    (0x900, 0x97F), (0xE00, 0xE7F), (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F),
    (0x2070, 0x209F), (0x20A0, 0x20CF), (0x2100, 0x218F), (0x2190, 0x23FF), (0x2460, 0x24FF), (0x2500, 0x27BF),
    (0x3000, 0x30FF), (0x3130, 0x318F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF),
    (0x1D400, 0x1D7FF), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x20000, 0x2A6DF),
]


def random_chars(rng: random.Random, n: int) -> str:
    """n assigned characters (no surrogates, no unassigned) from random BLOCKS, with spaces."""
    out = []
    while len(out) < n:
        lo, hi = rng.choice(BLOCKS)
        ch = chr(rng.randint(lo, hi))
        if unicodedata.category(ch) not in ("Cn", "Cs", "Co"):
            out.append(ch if rng.random() > 0.15 else " ")
    return "".join(out)


def mix(rng: random.Random, pool: list[str], k: int) -> str:
    """A subject and k items from pool, with styles, joined with commas or spaces."""
    parts = [rng.choice(SUBJECTS)] + rng.sample(pool, k) + rng.sample(STYLES, rng.randint(0, 3))
    rng.shuffle(parts)
    return rng.choice([", ", " ", ",", " , "]).join(parts)


def long_prompt(rng: random.Random) -> str:
    """Up to a few hundred BPE tokens: many subjects and styles, sometimes a word repeated."""
    parts = [rng.choice(SUBJECTS + STYLES + ACCENTED + EMOJI + CJK) for _ in range(rng.randint(15, 70))]
    if rng.random() < 0.2:
        parts.append(" ".join([rng.choice(STYLES)] * rng.randint(20, 60)))
    return ", ".join(parts)


def prompts() -> list[tuple[str, list[str]]]:
    rng = random.Random(SEED)
    groups: list[tuple[str, list[str]]] = []
    plain = SUBJECTS + [f"{s}, {', '.join(rng.sample(STYLES, rng.randint(1, 6)))}" for s in SUBJECTS * 6]
    plain += [s.upper() for s in SUBJECTS[:8]] + [s.title() for s in SUBJECTS[8:16]] + [""]
    groups.append(("plain", plain))
    nfd = [unicodedata.normalize("NFD", w) for w in ACCENTED]
    groups.append(("accents", ACCENTED + nfd + [mix(rng, ACCENTED, rng.randint(1, 4)) for _ in range(80)]))
    emoji_runs = ["".join(rng.sample(EMOJI, rng.randint(2, 6))) for _ in range(30)]
    groups.append(("emoji", EMOJI + emoji_runs + [mix(rng, EMOJI, rng.randint(1, 4)) for _ in range(70)]))
    groups.append(("cjk", CJK + [mix(rng, CJK, rng.randint(1, 3)) for _ in range(80)]))
    groups.append(("scripts", SCRIPTS + [mix(rng, SCRIPTS, rng.randint(1, 3)) for _ in range(60)]))
    groups.append(("punctuation", PUNCT + [mix(rng, PUNCT, rng.randint(1, 4)) for _ in range(80)]))
    groups.append(("numbers", NUMBERS + [mix(rng, NUMBERS, rng.randint(1, 4)) for _ in range(70)]))
    ws = WHITESPACE + [rng.choice(WHITESPACE).join(rng.sample(SUBJECTS, 2)) for _ in range(40)]
    ws += [mix(rng, WHITESPACE, rng.randint(1, 4)) for _ in range(50)]
    groups.append(("whitespace", ws))
    groups.append(("apostrophes", APOSTROPHES + [mix(rng, APOSTROPHES, rng.randint(1, 4)) for _ in range(70)]))
    groups.append(("long", [long_prompt(rng) for _ in range(70)]))
    groups.append(("specials", SPECIALS + [mix(rng, SPECIALS, rng.randint(1, 2)) for _ in range(15)]))
    groups.append(("random", [random_chars(rng, rng.randint(1, 120)) for _ in range(120)]))
    return groups


def to_line(prompt: str) -> str:
    """A JSON string literal; invisible characters (controls, format, separators) as escapes."""
    def char(ch: str) -> str:
        invisible = unicodedata.category(ch)[0] in "CZ" and ch != " "
        return json.dumps(ch)[1:-1] if invisible or ch in '"\\' else ch
    return '"' + "".join(map(char, prompt)) + '"'


def main() -> None:
    groups = prompts()
    total = sum(len(g) for _, g in groups)
    lines = [
        "# Prompts for the tokenizer parity test, one JSON string per line.",
        "# Written by tests/data/make_tokenizer_corpus.py (seed 0); edit that script, not this file.",
        "# " + ", ".join(f"{name} {len(g)}" for name, g in groups) + f"; total {total}",
    ]
    for _, group in groups:
        lines += [to_line(p) for p in group]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT.name}: {total} prompts")


if __name__ == "__main__":
    main()
