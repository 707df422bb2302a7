"""bertforge's tokenizer gives exactly the token ids of Google's FullTokenizer."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bertforge.config import VocabConfig
from bertforge.tokenization import LineEncoder, basic_words, load_vocab
from bertforge.vocab import count_texts, train_vocab
from tests.reference.nasty_text import ascii_lines, nasty_lines

pytestmark = pytest.mark.reference


def build_vocabs(tmp: Path, demo_path: Path, lines: list[bytes]) -> dict[bool, Path]:
    """Train a cased and an uncased vocab on the nasty text plus some of the demo corpus."""
    kjv = gzip.decompress(demo_path.read_bytes()).split(b"\n")[:6000]
    corpus = tmp / "corpus.txt"
    corpus.write_bytes(b"\n".join(lines + kjv) + b"\n")
    out = {}
    for lower in (True, False):
        d = tmp / ("uncased" if lower else "cased")
        cfg = VocabConfig(input=(str(corpus),), output=str(d), vocab_size=12000,
                          do_lower_case=lower, limit_alphabet=1500, min_frequency=1,
                          heldout_sentences=0, progress=False)  # fmt: skip
        train_vocab(cfg)
        out[lower] = d
    return out


def test_token_ids_identical_to_google(google, tmp_path: Path, demo_path: Path):
    lines = nasty_lines() + ascii_lines(600)
    vocabs = build_vocabs(tmp_path, demo_path, lines)
    probe = tmp_path / "probe.txt"
    probe.write_bytes(b"\n".join(lines))
    tasks = [
        {"tokenize": {"vocab": str(d / "vocab.txt"), "do_lower_case": lower,
                      "input": str(probe), "output": str(tmp_path / f"google_{lower}.jsonl")}}
        for lower, d in vocabs.items()
    ]  # fmt: skip
    tasks += [
        {"basic": {"do_lower_case": lower, "input": str(probe),
                   "output": str(tmp_path / f"basic_{lower}.jsonl")}}
        for lower in vocabs
    ]  # fmt: skip
    google.run(tasks, tmp_path)
    for lower, d in vocabs.items():
        tokenizer = load_vocab(d).tokenizer()
        texts = [raw.decode("utf-8", "ignore") for raw in probe.read_bytes().split(b"\n")]
        ours = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        theirs = [
            json.loads(x) for x in (tmp_path / f"google_{lower}.jsonl").read_text().splitlines()
        ]
        assert len(ours) == len(theirs) == len(lines)
        mismatches = [(i, texts[i]) for i in range(len(ours)) if ours[i] != theirs[i]]
        assert not mismatches, (
            f"do_lower_case={lower}: {len(mismatches)} lines differ, e.g. {mismatches[:3]}"
        )
        # The data stage's encoder, in batches that reuse its cache and (it is small) shrink it.
        encoder = LineEncoder(load_vocab(d).tokens, lower, None, max_entries=3000)
        cached = []
        for i in range(0, len(texts), 300):
            flat, counts = encoder.encode(texts[i : i + 300], np.dtype(np.int64))
            cached += [a.tolist() for a in np.split(flat, np.cumsum(counts)[:-1])]
        differ = [(i, texts[i]) for i in range(len(texts)) if cached[i] != theirs[i]]
        assert not differ, f"do_lower_case={lower}: LineEncoder differs, e.g. {differ[:3]}"
        unk = load_vocab(d).id("[UNK]")
        assert any(unk in ids for ids in theirs), "the probe should exercise [UNK] too"
        assert sum(len(ids) for ids in theirs) > 20000
        # The bulk normalizer that counts words for vocab training: BasicTokenizer's words.
        words = [
            json.loads(x) for x in (tmp_path / f"basic_{lower}.jsonl").read_text().splitlines()
        ]
        bulk = [line.split() for line in basic_words(texts, lower, None)]
        differ = [(i, texts[i]) for i in range(len(texts)) if bulk[i] != words[i]]
        assert not differ, f"do_lower_case={lower}: basic_words differs, e.g. {differ[:3]}"
        # The vocab stage's word counts (numpy on the ASCII lines, basic_words on the rest).
        cfg = VocabConfig(input=("x",), output="y", do_lower_case=lower)
        assert sum(text.isascii() for text in texts) > 100
        assert count_texts(texts, cfg).to_counter() == Counter(w for line in words for w in line)
