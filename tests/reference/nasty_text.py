"""Text that stresses tokenizers: many scripts, normalization forms, invisible and broken bytes."""

from __future__ import annotations

import random
import unicodedata

HAND_WRITTEN = [
    "The quick brown fox jumps over the lazy dog. Mr. O'Neil's e-mail: a.b@c.com (100%)!",
    'Don\'t stop-believing... "quoted" [brackets] {braces} <angle> #hash $5.00 ^caret~',
    "İstanbul'da IĞDIR ılık ISPARTA ÇOK ŞİŞLİ ğüşiöç İi Iı — Türkçe büyük/küçük harf",
    "Blåbærsyltetøy på brødskiva; ÆØÅ æøå Ærlig talt, Øystein og Åse.",
    "Café naïve résumé coöperate déjà vu São Paulo Ångström Zürich",
    unicodedata.normalize("NFD", "Café naïve résumé São Paulo Ångström Zürich İstanbul"),
    "東京は日本の首都です。中文分词测试，繁體字測試。한국어 텍스트 입니다. カタカナ ひらがな",
    "مرحبا بالعالم، هذا نص عربي. עברית טקסט. Ελληνικά ΟΔΟΣ οδός Σίσυφος ΣΊΣΥΦΟΣ",
    "Emoji 🙂👍🏽 👨‍👩‍👧‍👦 🇳🇴 ❤️ flags and ZWJ sequences 1️⃣",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060word joiner\u00adsoft hyphen",
    "control\x07bell\x1bescape\x00nul\x01\x02\x7fdel and \x85next line \u2028sep\u2029par",
    "tabs\tand  many   spaces\u00a0nbsp\u3000ideographic\u2003em space",
    "lone\rcarriage return inside a line",
    "fullwidth ＡＢＣ１２３！ math ∑∫√∞≠ currency €£¥₹ superscript x² ℌ ﬁ ligature",
    "हिन्दी भाषा देवनागरी ไทย ภาษาไทย ქართული Հայերեն አማርኛ",
    "a" * 99 + " " + "b" * 100 + " " + "c" * 101 + " " + "é" * 120,
    "numbers 3.14159 1,000,000 -42 +7 1e-5 0x1F 2026-11-23 12:30",
    "combining only \u0301\u0308 e\u0301 a\u030a i\u0307 I\u0307",
    "private use \ue000\uf8ff and unassigned \u0378 and replacement \ufffd char",
    "ǅ ǈ ǋ ǲ titlecase; ß ẞ Straße STRASSE; ŉ ǰ ΐ special casing",
    "",
    "   ",
    "[CLS] [SEP] [MASK] [UNK] [PAD] ##ing [unused0] literal specials",
]

# Bytes that are not valid UTF-8, embedded in otherwise normal lines.
BROKEN = [
    b"broken \xff\xfe bytes in the middle",
    b"truncated multibyte \xe4\xb8 then text",
    b"overlong \xc0\xaf and surrogate \xed\xa0\x80 encodings",
    b"\xef\xbb\xbfBOM at the start of a line",
    b"latin-1 caf\xe9 na\xefve",
]

RANGES = [
    (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
    (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F),
    (0x2190, 0x23FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xF900, 0xFAFF),
    (0xFE00, 0xFE6F), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x20000, 0x2004F), (0x0, 0x1F),
]  # fmt: skip


def random_lines(n: int, seed: int = 0) -> list[str]:
    """Random strings over many Unicode blocks, with spaces, as a fuzz corpus."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 60)):
            lo, hi = rng.choice(RANGES)
            c = rng.randint(lo, hi)
            if 0xD800 <= c <= 0xDFFF:
                continue
            chars.append(chr(c))
            if rng.random() < 0.2:
                chars.append(" ")
        out.append("".join(chars))
    return out


def nasty_lines(n_random: int = 3000) -> list[bytes]:
    """All test lines as raw bytes (no line contains b"\\n")."""
    lines = [s.encode("utf-8") for s in HAND_WRITTEN] + BROKEN
    lines += [s.replace("\n", " ").encode("utf-8") for s in random_lines(n_random)]
    return [line.replace(b"\n", b" ") for line in lines]


def ascii_lines(n: int, seed: int = 1) -> list[bytes]:
    """Random ASCII lines: words of every ASCII character, control characters included,
    recurring (1-20 characters), as the vocab stage's fast ASCII word counting sees them."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(128) if c != 10]
    pool = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))) for _ in range(400)]
    pool += ["Word", "WORD", "word.", "(Word)", "e-mail", "don't", "Hello,", "x" * 7, "y" * 8]
    lines = (" ".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(n))
    return [line.encode() for line in lines]
