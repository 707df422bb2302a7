"""Shared helpers: tiny corpora written on the fly; the bundled demo corpus."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from bertforge.cli import demo_corpus

MIXED_DOCS = [
    ["The quick brown fox jumps over the lazy dog.", "It was not amused, said Mr. Smith!"],
    ["İstanbul'da ılık bir gün; çocuklar şarkı söylüyor.", "Öğretmen güldü: ğ ü ş ç ö ı."],
    ["Blåbærsyltetøy på brødskiva er godt.", "Ærlig talt, det var søtt."],
    ["東京は日本の首都です。", "Café, naïve, résumé — déjà vu."],
    ["مرحبا بالعالم", "Emoji 🙂 and zero\u200bwidth and control\x07chars."],
]


def write_corpus(path: Path, docs: list[list[str]], compress: bool = False) -> Path:
    """Write documents in Google's format (blank line between documents)."""
    text = "\n\n".join("\n".join(d) for d in docs) + "\n"
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def mixed_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "mixed.txt", MIXED_DOCS * 20)


@pytest.fixture(scope="session")
def demo_path() -> Path:
    return demo_corpus()
