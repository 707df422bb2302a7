"""Batch masking (numpy): Google's budget and 80/10/10 rule, whole words, determinism."""

from __future__ import annotations

import numpy as np

from bertforge.masking import MaskSpec, candidates, mask_batch, num_to_predict

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


def test_replacement_shares_are_80_10_10():
    ids, lengths, sep_a = make_batch(20000)
    out = mask_batch(ids, lengths, sep_a, spec(), np.random.default_rng(2))
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
