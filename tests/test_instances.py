"""Google's instance algorithm: invariants, masking rules, determinism (fast, no TensorFlow)."""

from __future__ import annotations

import random

import numpy as np

from bertforge.instances import (
    InstanceParams,
    VocabIds,
    create_masked_lm_predictions,
    create_training_instances,
    truncate_seq_pair,
)
from bertforge.tokenization import google_layout

TOKENS = google_layout([f"w{i}" for i in range(40)] + [f"##p{i}" for i in range(20)], 5)
VOCAB = VocabIds.from_tokens(TOKENS)
WORDS = list(range(VOCAB.mask_id + 1, VOCAB.mask_id + 41))
PIECES = list(range(VOCAB.mask_id + 41, len(TOKENS)))


def make_documents(seed: int = 0) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [
        [[rng.choice(WORDS) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 8))]
        for _ in range(40)
    ]


def test_instances_are_well_formed():
    params = InstanceParams(max_seq_length=32, max_predictions_per_seq=5)
    instances = create_training_instances(make_documents(), params, VOCAB, 3, random.Random(1))
    assert len(instances) > 100
    for inst in instances:
        ids, seg = inst.input_ids, inst.segment_ids
        assert len(ids) == len(seg) <= 32
        assert ids[0] == VOCAB.cls_id and ids[-1] == VOCAB.sep_id
        a_len = seg.count(0) - 1  # [CLS] A [SEP]; positions of [SEP] are never masked
        assert ids[a_len] == VOCAB.sep_id and a_len >= 2
        assert seg == [0] * (a_len + 1) + [1] * (len(ids) - a_len - 1) and seg[-2] == 1
        assert 1 <= len(inst.masked_lm_positions) <= 5
        assert inst.masked_lm_positions == sorted(set(inst.masked_lm_positions))
        for pos, label in zip(inst.masked_lm_positions, inst.masked_lm_ids, strict=True):
            assert label not in (VOCAB.cls_id, VOCAB.sep_id) and 0 < pos < len(ids) - 1
    nsp = sum(i.is_random_next for i in instances) / len(instances)
    assert 0.4 < nsp < 0.75  # 50% by coin, plus every one-sentence chunk


def test_same_seed_same_instances_other_seed_differs():
    params = InstanceParams(max_seq_length=32)
    a = create_training_instances(make_documents(), params, VOCAB, 2, random.Random(7))
    b = create_training_instances(make_documents(), params, VOCAB, 2, random.Random(7))
    c = create_training_instances(make_documents(), params, VOCAB, 2, random.Random(8))
    assert a == b and a != c


def test_mask_replacement_shares():
    params = InstanceParams(max_seq_length=128, max_predictions_per_seq=20)
    rng = random.Random(3)
    counts = {"mask": 0, "kept": 0, "random": 0}
    for _ in range(400):
        ids = [VOCAB.cls_id, *[rng.choice(WORDS) for _ in range(100)], VOCAB.sep_id]
        out, positions, labels = create_masked_lm_predictions(ids, params, VOCAB, rng)
        assert len(positions) == 15  # round(102 * 0.15)
        for p, label in zip(positions, labels, strict=True):
            kind = "mask" if out[p] == VOCAB.mask_id else "kept" if out[p] == label else "random"
            counts[kind] += 1
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.02
    assert abs(counts["kept"] / total - 0.1) < 0.02


def test_whole_word_masking_masks_all_pieces_of_a_word():
    params = InstanceParams(max_seq_length=128, max_predictions_per_seq=20, do_whole_word_mask=True)
    rng = random.Random(5)
    for _ in range(50):
        ids = [VOCAB.cls_id]
        for _ in range(30):
            ids += [rng.choice(WORDS)] + [rng.choice(PIECES) for _ in range(rng.randint(0, 2))]
        ids.append(VOCAB.sep_id)
        _, positions, _ = create_masked_lm_predictions(ids, params, VOCAB, rng)
        covered = set(positions)
        for p in positions:  # a masked piece's whole word is masked
            start = p
            while VOCAB.is_continuation[ids[start]]:
                start -= 1
            end = p + 1
            while end < len(ids) and VOCAB.is_continuation[ids[end]]:
                end += 1
            assert set(range(start, end)) <= covered
        assert len(positions) <= 20


def test_truncate_seq_pair_trims_longer_side():
    rng = random.Random(0)
    a, b = list(range(10)), list(range(100, 103))
    truncate_seq_pair(a, b, 8, rng)
    assert len(a) + len(b) == 8 and b == [100, 101, 102]
    assert a == list(range(a[0], a[0] + 5))  # a contiguous run: only the ends were cut
    a, b = [1, 2], [3, 4]
    truncate_seq_pair(a, b, 3, rng)
    assert len(a) == 2 and len(b) == 1  # a tie trims B


def test_fast_truncation_matches_google_distribution():
    from bertforge.instances import truncate_seq_pair_fast

    for la, lb, limit in [(10, 3, 8), (3, 10, 8), (7, 7, 9), (20, 15, 12), (5, 6, 4), (4, 4, 20)]:
        results = {}
        for name, fn, rng in (("google", truncate_seq_pair, random.Random(1)),
                              ("fast", truncate_seq_pair_fast, random.Random(2))):  # fmt: skip
            rows = []
            for _ in range(4000):
                a, b = list(range(la)), list(range(100, 100 + lb))
                fn(a, b, limit, rng)
                rows.append((len(a), len(b), a[0] if a else 0, b[0] - 100 if b else 0))
            results[name] = np.array(rows, dtype=float)
        g, f = results["google"], results["fast"]
        assert (g[:, :2] == f[:, :2]).all(), "the kept lengths are not random"
        for col in (2, 3):  # tokens cut from the front: Binomial(k, 1/2) in both
            se = np.sqrt(g[:, col].var() / 4000 + f[:, col].var() / 4000)
            assert abs(g[:, col].mean() - f[:, col].mean()) <= 4 * se + 1e-9
            assert abs(g[:, col].var() - f[:, col].var()) <= 0.15 * g[:, col].var() + 1e-9


def test_pair_ranges_are_document_pairs_on_token_ranges():
    """The default mode's range-based segmenting gives document_pairs' instances (with the
    fast truncation), call for call: same rng stream, same segments, same trims."""
    from itertools import accumulate, chain

    from bertforge.instances import document_pairs, pair_ranges, truncate_seq_pair_fast

    gen = random.Random(7)
    documents = [
        [[gen.randrange(1000, 2000) for _ in range(gen.choice([1, 3, 9, 40, 90]))]
         for _ in range(gen.randint(1, 12))]
        for _ in range(60)
    ]  # fmt: skip
    for seq, short, dupe in ((128, 0.1, 3), (32, 0.5, 2), (12, 0.0, 1)):
        expected = []
        rng = random.Random(seq)
        docs = [list(d) for d in documents]
        rng.shuffle(docs)
        for _ in range(dupe):
            for index in range(len(docs)):
                expected += document_pairs(docs, index, seq, short, rng, truncate_seq_pair_fast)
        after_expected = rng.random()

        flat = list(chain.from_iterable(chain.from_iterable(documents)))
        starts = list(accumulate((len(s) for d in documents for s in d), initial=0))
        bounds, k = [], 0
        for d in documents:
            bounds.append(starts[k : k + len(d) + 1])
            k += len(d)
        rng = random.Random(seq)
        r = pair_ranges(bounds, seq, short, dupe, rng)
        got = [
            (flat[a0 : a0 + la], flat[b0 : b0 + lb], bool(nsp))
            for a0, la, b0, lb, nsp in zip(
                r.a_start, r.a_len, r.b_start, r.b_len, r.is_random_next, strict=True
            )
        ]
        assert got == expected and len(got) > 50
        assert rng.random() == after_expected  # the same number of draws
