"""wordcount: exact token counts at numpy speed (the vocab stage's word counting)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from bertforge import wordcount
from bertforge.tokenization import bert_normalizer, bert_pre_tokenizer
from bertforge.wordcount import TokenCounter


def random_ascii(rng: random.Random, n: int) -> str:
    """Words of 1-40 characters (7 and 8 bytes pack differently) from every ASCII character,
    recurring so that counts exceed one, with runs of spaces."""
    pool = ["".join(rng.choice([chr(c) for c in range(128)]) for _ in range(rng.randint(1, 40)))
            for _ in range(300)]  # fmt: skip
    pool += ["Word", "word", "WORD", "abcdefg", "abcdefgh", "abcdefgH", "x" * 8, "x" * 7]
    return " ".join(rng.choice(pool) + " " * rng.randint(0, 2) for _ in range(n))


def random_utf8(rng: random.Random, n: int) -> str:
    pool = ["".join(chr(rng.choice([0, 9, 65, 97, 0xE9, 0x130, 0x4E2D, 0x1F642, 0xFFFD]))
                    for _ in range(rng.randint(1, 12))) for _ in range(200)]  # fmt: skip
    return " ".join(rng.choice(pool) + " " * rng.randint(0, 2) for _ in range(n))


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def counted(counter: TokenCounter) -> Counter[str]:
    tokens, counts = counter.result()
    assert len(tokens) == len(set(tokens)) == len(counts)
    return Counter(dict(zip(tokens, counts.tolist(), strict=True)))


@pytest.mark.parametrize("lower", [True, False])
def test_ascii_words_are_berts_words(lower: bool):
    text = random_ascii(random.Random(1), 4000)
    assert text.isascii()
    normalizer, pre = bert_normalizer(lower, None), bert_pre_tokenizer()
    counter = TokenCounter()
    want: Counter[str] = Counter()
    for part in chunks(text, 3001):  # several chunks, merged by result()
        counter.add_words(part.encode("ascii"), lower, TokenCounter())
        want.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(part)))
    got = counted(counter)
    assert got == want
    assert any(len(w) == 7 for w in got) and any(len(w) >= 8 and got[w] > 1 for w in got)


def test_space_separated_tokens():
    text = random_utf8(random.Random(2), 5000)
    counter = TokenCounter()
    want: Counter[str] = Counter()
    for part in chunks(text, 2500):
        counter.add_space_separated(part.encode("utf-8"))
        want.update(t for t in part.split(" ") if t)
    assert counted(counter) == want
    assert any("\x00" in t for t in want)  # NUL bytes pack like any other byte


def test_colliding_hashes_still_count_exactly(monkeypatch):
    """With a hash that maps every long token of a length to one value, the verification
    catches it and the long tokens are counted the sure way."""
    monkeypatch.setattr(wordcount, "_mix", lambda x: np.zeros_like(x))
    rng = random.Random(3)
    text = random_ascii(rng, 3000) + " " + random_utf8(rng, 3000)
    counter = TokenCounter()
    for part in chunks(text, 4000):
        counter.add_space_separated(part.encode("utf-8"))
    assert counted(counter) == Counter(t for part in chunks(text, 4000)
                                       for t in part.split(" ") if t)  # fmt: skip


def test_empty_text():
    counter = TokenCounter()
    counter.add_space_separated(b"")
    counter.add_space_separated(b"    ")
    counter.add_words(b" \t\x00\x7f ", True, TokenCounter())
    assert counter.result()[0] == []


def test_tokens_with_other_characters_go_to_rest():
    """ASCII is cleaned, lowercased and split off; a token with any other character is left
    for the caller (here whole, punctuation and all, but ASCII lowercased)."""
    counter, rest = TokenCounter(), TokenCounter()
    counter.add_words("Çok GÜZEL, dedi:\t«EVET» ok.\x00ok".encode(), True, rest)
    assert counted(counter) == Counter({",": 1, ":": 1, "dedi": 1, ".": 1, "ok": 2})
    assert counted(rest) == Counter({"Çok": 1, "gÜzel": 1, "«evet»": 1})
