"""Google-compatible data creation gives Google's records, record for record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bertforge.cli import main
from bertforge.config import DataConfig, VocabConfig
from bertforge.data import create_data
from bertforge.datacheck import concat, read_tfrecord
from bertforge.tfrecord import decode_example, read_records
from bertforge.vocab import train_vocab
from tests.reference.nasty_text import HAND_WRITTEN

pytestmark = pytest.mark.reference

TURKISH = [
    "Türkiye Cumhuriyeti'nin başkenti Ankara'dır.",
    "İstanbul, Boğaziçi'nin iki yakasında kurulmuş büyük bir şehirdir.",
    "Çocuklar bahçede oynuyor; öğretmenleri onları izliyor.",
    "Güneşli bir günde deniz kıyısında yürümek çok güzeldir.",
]


def build_corpus(path: Path, demo_path: Path) -> Path:
    """A few hundred KB: KJV chapters, Turkish, and broken lines between them."""
    kjv = gzip.decompress(demo_path.read_bytes()).decode().split("\n\n")[:120]
    broken = [b"bad \xff\xfe bytes here", b"\xc3", b"ctl\x07\x00 chars", b"   ", b"\xe4\xb8 x"]
    out = []
    for i, chapter in enumerate(kjv):
        out.append(chapter.encode())
        if i % 10 == 0:
            out.append("\n".join(TURKISH + HAND_WRITTEN[i % 7 : i % 7 + 3]).encode())
        if i % 15 == 0:
            out.append(b"\n".join([*broken[i % 5 :], b"single sentence document"]))
    path.write_bytes(b"\n\n".join(out) + b"\nlast line without blank")
    return path


def google_create(google, tmp_path: Path, corpus: Path, vocab_dir: Path, lower: bool,
                  flags: dict) -> Path:  # fmt: skip
    """Google's create_pretraining_data on corpus; returns its TFRecord file."""
    out = tmp_path / "google.tfrecord"
    google.run([{"create": {"vocab": str(vocab_dir / "vocab.txt"), "do_lower_case": lower,
                            "input": str(corpus), "output": str(out), **flags}}],
               tmp_path)  # fmt: skip
    return out


@pytest.mark.parametrize("lower", [True, False])
def test_google_compatible_records_identical(google, tmp_path: Path, demo_path: Path, lower):
    corpus = build_corpus(tmp_path / "corpus.txt", demo_path)
    assert corpus.stat().st_size > 200_000
    vdir = tmp_path / "vocab" / "v"
    train_vocab(VocabConfig(input=(str(corpus),), output=str(vdir), vocab_size=3000,
                            do_lower_case=lower, progress=False))  # fmt: skip
    flags = dict(max_seq_length=64, max_predictions_per_seq=10, masked_lm_prob=0.15,
                 short_seq_prob=0.1, dupe_factor=2, random_seed=4321)  # fmt: skip
    theirs_path = google_create(google, tmp_path, corpus, vdir, lower, flags)

    # through the CLI, with a bare vocab.txt and Google's flag spellings, as users paste them
    out = tmp_path / "ours"
    argv = ["data", f"--input_file={corpus}", f"--vocab_file={vdir / 'vocab.txt'}",
            f"--do_lower_case={lower}", f"--output_dir={out}", "--google-compatible",
            *(f"--{k}={v}" for k, v in flags.items())]  # fmt: skip
    assert main(argv) == 0
    ours_path = out / "data.tfrecord"
    with open(theirs_path, "rb") as f:
        theirs = [decode_example(r) for r in read_records(f)]
    with open(ours_path, "rb") as f:
        ours = [decode_example(r) for r in read_records(f)]
    assert len(theirs) > 500 and len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"record {i} differs: {a} != {b}"
    assert {r["next_sentence_labels"][0] for r in ours} == {0, 1}


@pytest.fixture(scope="module")
def corpus_and_vocab(tmp_path_factory, demo_path: Path) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ref-data")
    corpus = build_corpus(tmp / "corpus.txt", demo_path)
    train_vocab(VocabConfig(input=(str(corpus),), output=str(tmp / "vocab"), vocab_size=3000,
                            progress=False))  # fmt: skip
    return corpus, tmp / "vocab"


def test_tensorflow_parses_our_shards(google, tmp_path: Path, corpus_and_vocab):
    """Our default-mode TFRecords go through run_pretraining.py's own decoding."""
    corpus, vocab = corpus_and_vocab
    out = create_data(DataConfig(input=(str(corpus),), vocab=str(vocab), output=str(tmp_path / "d"),
                                 format="tfrecord", max_seq_length=64, max_predictions_per_seq=10,
                                 dupe_factor=1, unit_mb=0.1, progress=False)).output  # fmt: skip
    shards = sorted(out.glob("shard-*.tfrecord"))
    assert len(shards) >= 3
    parsed = tmp_path / "parsed.jsonl"
    google.run([{"parse": {"inputs": [str(s) for s in shards], "max_seq_length": 64,
                           "max_predictions_per_seq": 10, "output": str(parsed)}}],
               tmp_path)  # fmt: skip
    theirs = [json.loads(line) for line in parsed.read_text().splitlines()]
    ours = []
    for shard in shards:
        with open(shard, "rb") as f:
            ours += [decode_example(r) for r in read_records(f)]
    assert len(theirs) == len(ours) > 1000
    for i, (t, o) in enumerate(zip(theirs, ours, strict=True)):
        assert t == o, f"record {i}: TensorFlow parsed {t}, we wrote {o}"


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(values, bins=edges)[0] / len(values)


def test_default_mode_statistics_match_google(google, tmp_path: Path, corpus_and_vocab):
    """Bounded shuffle + unit-local random next + numpy masks: the same distribution of
    instances as Google's global version (length, NSP share, masks), within sampling error."""
    corpus, vocab = corpus_and_vocab
    flags = dict(max_seq_length=64, max_predictions_per_seq=10, masked_lm_prob=0.15,
                 short_seq_prob=0.1, dupe_factor=4, random_seed=99)  # fmt: skip
    theirs_path = google_create(google, tmp_path, corpus, vocab, True, flags)
    out = create_data(DataConfig(input=(str(corpus),), vocab=str(vocab), output=str(tmp_path / "d"),
                                 format="tfrecord", unit_mb=0.05, progress=False,
                                 **flags)).output  # fmt: skip
    theirs = read_tfrecord(theirs_path)
    ours = concat([read_tfrecord(p) for p in sorted(out.glob("shard-*"))])
    n1, n2 = len(theirs), len(ours)
    assert n1 > 3000 and abs(n1 - n2) / n1 < 0.05, (n1, n2)

    def close(a: np.ndarray, b: np.ndarray, what: str) -> None:
        se = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se + 1e-9, f"{what}: {a.mean()} vs {b.mean()}"

    close(theirs.next_sentence, ours.next_sentence, "random-next share")
    close(theirs.lengths, ours.lengths, "mean length")
    close(theirs.counts, ours.counts, "masked per instance")
    a_len = lambda b: (b.segment_ids == 0).sum(1) - (64 - b.lengths) - 2  # noqa: E731
    close(a_len(theirs), a_len(ours), "segment A length")
    edges = np.array([0, 16, 32, 48, 60, 63, 65])
    p1, p2 = shares(theirs.lengths, edges), shares(ours.lengths, edges)
    se = np.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    assert (abs(p1 - p2) < 4 * se + 1e-3).all(), (p1, p2)
    for batch in (theirs, ours):  # mask rate: [MASK] 80%, kept 10%, random 10%
        assert batch.positions is not None and batch.labels is not None
        rows = np.repeat(np.arange(len(batch)), batch.counts)
        slots = np.concatenate([np.arange(c) for c in batch.counts])
        now = batch.input_ids[rows, batch.positions[rows, slots]]
        assert abs((now == 103).mean() - 0.8) < 0.02  # [MASK] is id 103 in Google's layout
