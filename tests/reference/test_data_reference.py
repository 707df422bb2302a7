"""Google-compatible data creation gives Google's records, record for record."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from bertforge.config import VocabConfig
from bertforge.corpus import CorpusStats, resolve_inputs
from bertforge.data import google_instances, write_tfrecords
from bertforge.instances import InstanceParams, VocabIds
from bertforge.tfrecord import decode_example, read_records
from bertforge.tokenization import load_vocab
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


@pytest.mark.parametrize("lower", [True, False])
def test_google_compatible_records_identical(google, tmp_path: Path, demo_path: Path, lower):
    corpus = build_corpus(tmp_path / "corpus.txt", demo_path)
    assert corpus.stat().st_size > 200_000
    vdir = tmp_path / "vocab"
    train_vocab(VocabConfig(input=(str(corpus),), output=str(vdir), vocab_size=3000,
                            do_lower_case=lower, progress=False))  # fmt: skip
    flags = dict(max_seq_length=64, max_predictions_per_seq=10, masked_lm_prob=0.15,
                 short_seq_prob=0.1, dupe_factor=2, random_seed=4321)  # fmt: skip
    theirs_path = tmp_path / "google.tfrecord"
    google.run([{"create": {"vocab": str(vdir / "vocab.txt"), "do_lower_case": lower,
                            "input": str(corpus), "output": str(theirs_path), **flags}}],
               tmp_path)  # fmt: skip

    vocab = load_vocab(vdir)
    params = InstanceParams(flags["max_seq_length"], flags["short_seq_prob"],
                            flags["masked_lm_prob"], flags["max_predictions_per_seq"])  # fmt: skip
    instances = google_instances(
        resolve_inputs([str(corpus)]), vocab.tokenizer(), VocabIds.from_tokens(vocab.tokens),
        params, flags["dupe_factor"], flags["random_seed"], CorpusStats(),
    )  # fmt: skip
    ours_path = tmp_path / "ours.tfrecord"
    write_tfrecords(instances, [ours_path], params)

    with open(theirs_path, "rb") as f:
        theirs = [decode_example(r) for r in read_records(f)]
    with open(ours_path, "rb") as f:
        ours = [decode_example(r) for r in read_records(f)]
    assert len(theirs) > 500 and len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"record {i} differs: {a} != {b}"
    assert {r["next_sentence_labels"][0] for r in ours} == {0, 1}
