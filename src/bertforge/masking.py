"""Masked-LM masking of a whole batch at once, in numpy (the data stage's static masks and the
trainer's dynamic masks).

The rule is Google's (instances.create_masked_lm_predictions) applied to many instances at a
time: per instance, num_to_predict = min(max_predictions_per_seq, max(1, round(length *
masked_lm_prob))) tokens are chosen among all but [CLS] and the two [SEP]s, in a random order
of candidates (single tokens, or whole words with whole-word masking, where a `##` piece joins
the candidate before it), skipping a word that would overshoot the budget; each chosen token
becomes [MASK] (80%), stays (10%) or becomes a random vocabulary id (10%). The distribution is
Google's; the random call order is not (Google's exact order lives in instances.py).

An instance is given as its padded ids, its length and the index of its first [SEP] (segment
A is 1..sep_a-1, segment B sep_a+1..length-2), which is how the native shards store it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskSpec:
    """What masking needs: the budget and the vocabulary facts."""

    masked_lm_prob: float
    max_predictions_per_seq: int
    do_whole_word_mask: bool
    vocab_size: int
    mask_id: int
    is_continuation: np.ndarray  # bool per vocab id: the piece starts with "##"


@dataclass(frozen=True)
class MaskedBatch:
    input_ids: np.ndarray  # [n, seq] after masking
    positions: np.ndarray  # [n, max_predictions] sorted per row, 0-padded
    labels: np.ndarray  # [n, max_predictions] original ids, 0-padded
    counts: np.ndarray  # [n] masked tokens per row


def candidates(lengths: np.ndarray, sep_a: np.ndarray, seq: int) -> np.ndarray:
    """[n, seq] bool: the maskable positions (not [CLS], not a [SEP], not padding)."""
    pos = np.arange(seq)
    return (pos >= 1) & (pos < lengths[:, None] - 1) & (pos != sep_a[:, None])


def num_to_predict(lengths: np.ndarray, spec: MaskSpec) -> np.ndarray:
    """Google's budget per instance (Python's round and numpy's both round half to even)."""
    wanted = np.maximum(1, np.round(lengths * spec.masked_lm_prob)).astype(np.int64)
    return np.minimum(spec.max_predictions_per_seq, wanted)


class RowRng:
    """Stands in for a numpy Generator in mask_batch over rows [lo, hi) of a batch, so that
    each row's draws depend only on the key and the row's place in the batch, never on which
    other rows are masked in the same call: a process that masks only its share of a step's
    batch gets exactly the rows that masking the whole batch gives.

    mask_batch draws one row of values per batch row in each call. Call i reads stream
    (*key, i), row j taking that stream's values from j x width on (a PCG64 advanced there:
    one 64-bit output per float64; integers are scaled floats so that each value takes one
    output too, with a bias below high / 2**53)."""

    def __init__(self, key: Sequence[int], lo: int, hi: int) -> None:
        self.key, self.lo, self.n = list(key), lo, hi - lo
        self.calls = 0

    def _stream(self, size: tuple[int, int]) -> np.random.Generator:
        assert size[0] == self.n, (size, self.n)
        bits = np.random.PCG64(np.random.SeedSequence([*self.key, self.calls]))
        bits.advance(self.lo * int(np.prod(size[1:])))
        self.calls += 1
        return np.random.Generator(bits)

    def random(self, size: tuple[int, int], dtype: type = np.float64) -> np.ndarray:
        return self._stream(size).random(size).astype(dtype, copy=False)

    def integers(self, low: int, high: int, size: tuple[int, int]) -> np.ndarray:
        return low + (self._stream(size).random(size) * (high - low)).astype(np.int64)


def mask_batch(
    ids: np.ndarray,
    lengths: np.ndarray,
    sep_a: np.ndarray,
    spec: MaskSpec,
    rng: np.random.Generator | RowRng,
) -> MaskedBatch:
    """Choose and replace the masked tokens of every row of `ids` ([n, seq], 0-padded)."""
    n, seq = ids.shape
    lengths = lengths.astype(np.int64)
    cand = candidates(lengths, sep_a.astype(np.int64), seq)
    budget = np.minimum(num_to_predict(lengths, spec), cand.sum(1))
    if spec.do_whole_word_mask:
        chosen = _choose_whole_words(ids, cand, budget, spec, rng)
    else:
        # The budget's smallest random keys among the candidates: a uniform random subset.
        keys = rng.random((n, seq), dtype=np.float32)
        keys[~cand] = 2.0  # never before a candidate
        p = min(spec.max_predictions_per_seq, seq)
        smallest = np.argpartition(keys, p - 1, axis=1)[:, :p] if p < seq else np.argsort(keys)
        order = np.take_along_axis(
            smallest, np.argsort(np.take_along_axis(keys, smallest, axis=1), axis=1), axis=1
        )
        chosen = np.zeros((n, seq), dtype=bool)
        np.put_along_axis(chosen, order, np.arange(order.shape[1]) < budget[:, None], axis=1)

    rows, cols = np.nonzero(chosen)  # row-major: positions ascend within a row
    counts = chosen.sum(1)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    p = spec.max_predictions_per_seq
    positions = np.zeros((n, p), dtype=np.int64)
    labels = np.zeros((n, p), dtype=ids.dtype)
    positions[rows, slot] = cols
    original = ids[rows, cols]
    labels[rows, slot] = original

    # One row of p values per batch row (RowRng's requirement); slot < counts <= p.
    r = rng.random((n, p))[rows, slot]
    random_ids = rng.integers(0, spec.vocab_size, (n, p))[rows, slot]
    replaced = np.where(r < 0.8, spec.mask_id, np.where(r < 0.9, original, random_ids))
    out = ids.copy()
    out[rows, cols] = replaced.astype(ids.dtype)
    return MaskedBatch(out, positions, labels, counts)


def _choose_whole_words(
    ids: np.ndarray,
    cand: np.ndarray,
    budget: np.ndarray,
    spec: MaskSpec,
    rng: np.random.Generator | RowRng,
) -> np.ndarray:
    """Whole-word choice: random word order, greedy, a word that overshoots is skipped."""
    n, seq = ids.shape
    cont = spec.is_continuation[ids] & cand
    seen_before = np.cumsum(cand, axis=1) - cand > 0  # a candidate exists to the left
    start = cand & ~(cont & seen_before)
    group = np.cumsum(start, axis=1) - 1  # word index of each candidate position
    num_groups = start.sum(1)
    rows, cols = np.nonzero(cand)
    group_len = np.bincount(rows * seq + group[rows, cols], minlength=n * seq).reshape(n, seq)

    keys = rng.random((n, seq))
    keys[np.arange(seq) >= num_groups[:, None]] = 2.0
    order = np.argsort(keys, axis=1, kind="stable")
    sorted_len = np.take_along_axis(group_len, order, axis=1)
    taken_sorted = np.zeros((n, seq), dtype=bool)
    count = np.zeros(n, dtype=np.int64)
    for t in range(int(num_groups.max(initial=0))):
        g = sorted_len[:, t]
        ok = (g > 0) & (count + g <= budget)
        taken_sorted[:, t] = ok
        count += np.where(ok, g, 0)
    taken = np.zeros((n, seq), dtype=bool)
    np.put_along_axis(taken, order, taken_sorted, axis=1)
    return cand & np.take_along_axis(taken, np.maximum(group, 0), axis=1)
