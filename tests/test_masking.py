"""Batch masking (numpy): Google's budget and 80/10/10 rule, whole words, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bertforge.masking import MaskSpec, RowRng, candidates, mask_batch, num_to_predict

SEQ, VOCAB, MASK_ID = 64, 500, 103
CONT = np.zeros(VOCAB, dtype=bool)
CONT[300:] = True  # ids >= 300 are "##" pieces


def make_batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, SEQ + 1, n)
    sep_a = np.array([rng.integers(2, length - 2) for length in lengths])
    ids = rng.integers(104, VOCAB, (n, SEQ))
    ids[:, 0] = 101
    ids[np.arange(n), sep_a] = 102
    ids[np.arange(n), lengths - 1] = 102
    ids[np.arange(SEQ) >= lengths[:, None]] = 0
    return ids, lengths, sep_a


def spec(whole_word: bool = False, prob: float = 0.15, max_pred: int = 10) -> MaskSpec:
    return MaskSpec(prob, max_pred, whole_word, VOCAB, MASK_ID, CONT)


def test_budget_positions_and_labels():
    ids, lengths, sep_a = make_batch(3000)
    s = spec()
    out = mask_batch(ids, lengths, sep_a, s, np.random.default_rng(1))
    cand = candidates(lengths, sep_a, SEQ)
    assert (out.counts == np.minimum(num_to_predict(lengths, s), cand.sum(1))).all()
    for r in range(len(ids)):
        m = out.counts[r]
        pos = out.positions[r, :m]
        assert (np.diff(pos) > 0).all() and cand[r, pos].all()
        assert (out.labels[r, :m] == ids[r, pos]).all()
        assert (out.positions[r, m:] == 0).all() and (out.labels[r, m:] == 0).all()
        unmasked = np.ones(SEQ, dtype=bool)
        unmasked[pos] = False
        assert (out.input_ids[r, unmasked] == ids[r, unmasked]).all()


@pytest.mark.parametrize("blocks", [False, True])
def test_replacement_shares_are_80_10_10(blocks):
    ids, lengths, sep_a = make_batch(20000)
    n = len(ids)
    rng = RowRng([2], 0, n) if blocks else np.random.default_rng(2)
    out = mask_batch(ids, lengths, sep_a, spec(), rng)
    rows = np.repeat(np.arange(len(ids)), out.counts)
    slots = np.concatenate([np.arange(c) for c in out.counts])
    new = out.input_ids[rows, out.positions[rows, slots]]
    old = out.labels[rows, slots]
    total = len(new)
    masked = (new == MASK_ID).mean()
    kept = ((new == old) & (new != MASK_ID)).mean()
    assert total > 100_000
    assert abs(masked - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / VOCAB)) < 0.01


def test_whole_word_masking_masks_all_pieces():
    ids, lengths, sep_a = make_batch(2000, seed=3)
    out = mask_batch(ids, lengths, sep_a, spec(whole_word=True), np.random.default_rng(4))
    cand = candidates(lengths, sep_a, SEQ)
    budget = np.minimum(num_to_predict(lengths, spec()), cand.sum(1))
    # a word longer than the budget is skipped (Google's rule), so a row can rarely get none
    assert (out.counts <= budget).all() and (out.counts >= 1).mean() > 0.95
    for r in range(len(ids)):
        chosen = set(out.positions[r, : out.counts[r]].tolist())
        for p in range(1, lengths[r] - 1):
            # a "##" piece and the candidate before it are masked together
            if cand[r, p] and CONT[ids[r, p]] and cand[r, :p].any():
                prev = max(q for q in range(p) if cand[r, q])
                assert (p in chosen) == (prev in chosen), (r, p)


def test_same_rng_same_masks():
    ids, lengths, sep_a = make_batch(100)
    a = mask_batch(ids, lengths, sep_a, spec(), np.random.default_rng(5))
    b = mask_batch(ids, lengths, sep_a, spec(), np.random.default_rng(5))
    c = mask_batch(ids, lengths, sep_a, spec(), np.random.default_rng(6))
    assert (a.input_ids == b.input_ids).all() and (a.positions == b.positions).all()
    assert not (a.positions == c.positions).all()


@pytest.mark.parametrize("whole_word", [False, True])
def test_a_share_of_the_rows_is_masked_as_in_the_whole_batch(whole_word):
    """RowRng: masking rows [lo, hi) alone gives those rows of the whole batch's masks, for
    any cut; another key gives other masks; rows alike get their own masks."""
    n = 103
    ids, lengths, sep_a = make_batch(n, seed=4)
    s = spec(whole_word)
    whole = mask_batch(ids, lengths, sep_a, s, RowRng([9, 1, 5], 0, n))
    cuts = [0, 1, 13, 32, 45, 65, n, n]
    for lo, hi in itertools.pairwise(cuts):
        part = mask_batch(ids[lo:hi], lengths[lo:hi], sep_a[lo:hi], s, RowRng([9, 1, 5], lo, hi))
        for name in ("input_ids", "positions", "labels", "counts"):
            assert np.array_equal(getattr(part, name), getattr(whole, name)[lo:hi]), (lo, hi)
    other = mask_batch(ids, lengths, sep_a, s, RowRng([9, 1, 6], 0, n))
    assert not np.array_equal(other.positions, whole.positions)  # another step, other masks

    longest = int(np.argmax(lengths))
    same = np.repeat(ids[longest : longest + 1], n, axis=0)  # one instance in every row
    out = mask_batch(same, np.repeat(lengths[longest], n), np.repeat(sep_a[longest], n), s,
                     RowRng([3], 0, n))  # fmt: skip
    assert len({tuple(p) for p in out.positions}) > n // 2  # one shared stream would give 1
