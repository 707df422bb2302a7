"""bertforge.sentences: lines into sentences for `bertforge data --split-sentences`."""

from __future__ import annotations

import random
import re

import pytest

from bertforge.sentences import split_sentences

CASES = [
    (  # Turkish: ordinals, titles and lowercase abbreviations stay inside their sentence
        "Dr. Ahmet Yılmaz 1. Dünya Savaşı hakkında konuştu. Ardından İstanbul'a gitti! Orada ne "
        "yaptı? Bilinmiyor... Prof. Ayşe Hanım ise vb. konulara değindi. 2023 yılında 3. kez "
        "geldi.",
        ["Dr. Ahmet Yılmaz 1. Dünya Savaşı hakkında konuştu.", "Ardından İstanbul'a gitti!",
         "Orada ne yaptı?", "Bilinmiyor...", "Prof. Ayşe Hanım ise vb. konulara değindi.",
         "2023 yılında 3. kez geldi."],
    ),
    (  # Norwegian: kl. 15.30, bl.a., f.eks., 17. mai
        "Han kom hjem kl. 15.30 i går. Det var bl.a. snakk om f.eks. været. 17. mai er "
        "nasjonaldagen. Hva nå?",
        ["Han kom hjem kl. 15.30 i går.", "Det var bl.a. snakk om f.eks. været.",
         "17. mai er nasjonaldagen.", "Hva nå?"],
    ),
    (  # English: initials, U.S., quotes and brackets; an end after a number is missed
        'Mr. Smith met J. R. R. Tolkien in the U.S. on Jan. 5. He said "Hello." Then he left. '
        "(See below.) It grew 3.5% in 2019. The end.",
        ["Mr. Smith met J. R. R. Tolkien in the U.S. on Jan. 5. He said \"Hello.\"",
         "Then he left.", "(See below.)", "It grew 3.5% in 2019. The end."],
    ),
    ("東京は日本の首都です。大阪は大きい。本当？はい！",
     ["東京は日本の首都です。", "大阪は大きい。", "本当？", "はい！"]),
    ("مرحبا بالعالم. كيف حالك؟ أنا بخير.", ["مرحبا بالعالم.", "كيف حالك؟", "أنا بخير."]),
    ("यह एक वाक्य है। यह दूसरा है।", ["यह एक वाक्य है।", "यह दूसरा है।"]),
    ("an end. then lowercase, e.g. this.", ["an end. then lowercase, e.g. this."]),
    ("Ends at the end.", ["Ends at the end."]),
    ("No end at all", ["No end at all"]),
    ("Spaces   between.   Them.", ["Spaces   between.", "Them."]),
    ("«Quoted.» «Next!» ¿Qué? ¡Sí!", ["«Quoted.»", "«Next!»", "¿Qué?", "¡Sí!"]),
]  # fmt: skip


@pytest.mark.parametrize(("line", "sentences"), CASES)
def test_split_sentences(line: str, sentences: list[str]) -> None:
    assert split_sentences(line) == sentences
    # nothing lost: the sentences give the line back, up to the whitespace at the cuts
    assert "".join(split_sentences(line)).replace(" ", "") == line.replace(" ", "")


def test_random_lines_lose_nothing() -> None:
    """Lines of ends, quotes, spaces, digits and letters of several scripts, drawn at random:
    every sentence is non-empty and stripped, and together they hold the line's characters
    but whitespace, in order."""
    rng = random.Random(0)
    alphabet = list("aAbBİıIçÇ  .!?…。！？؟।\"'”’»«()]1234 \t\u00a0東京مرحباXyz.")
    for _ in range(5000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))).strip()
        if not line:
            continue
        sentences = split_sentences(line)
        assert all(s and s == s.strip() for s in sentences), (line, sentences)
        assert re.sub(r"\s", "", "".join(sentences)) == re.sub(r"\s", "", line)
