"""Counting the tokens of a text at numpy speed, for `bertforge vocab`.

Written here because counting the words of the training sample was the largest part of the
vocab stage's time: Python's Counter costs ~0.25 us per token on the development machine (a
new str object, its hash and a dict probe per occurrence) and Hugging Face's trainer ~1 us per
word. Here a text is UTF-8 bytes in a numpy array, a token a span of them, and the counting
is a sort:

- a token of at most 7 bytes is packed exactly into one 64-bit key (its bytes, and its length
  in the top byte); the keys are sorted and counted, and decoded back from the keys. Most
  tokens of a text are this short.
- a longer token is hashed from its 8-byte chunks (each mixed by splitmix64's bijective
  finalizer, times a seeded random number per chunk position, summed, plus the length), the
  hashes are counted, and every token is then compared chunk by chunk with the first token
  of its hash. Counts are exact: if two different tokens ever shared a hash, the long tokens
  are counted again with a Counter.
- ASCII characters are also normalized here the way Google's BasicTokenizer does it (control
  characters removed, whitespace split, lowercasing, every punctuation character its own
  word), with lookup tables built from the tokenizer's own character classes, so a word made
  of ASCII alone is counted as BERT's word; a token with other characters is counted as it
  is, for the caller to normalize once per distinct token (`add_lines` then counts the
  results, weighted by how often each token occurred).

`TokenCounter` takes text chunk by chunk (small chunks stay in the CPU cache; memory is a few
tens of bytes per byte of a chunk) and merges the chunks' counts the same way, with numpy.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np

from bertforge.tokenization import categories, char_classes

HASH_SEED = 0x5EED
SPACE, NEWLINE = 32, 10
LETTER, SPACE_LIKE, REMOVED, PUNCT = 0, 1, 2, 3  # what an ASCII byte is to BERT
MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)


class TokenCounter:
    """Token counts over many chunks of text; `result()` merges them."""

    def __init__(self, hash_seed: int = HASH_SEED) -> None:
        self.hash_seed = hash_seed
        self._keys: list[np.ndarray] = []  # tokens of up to 7 bytes, packed exactly
        self._key_counts: list[np.ndarray] = []
        self._long: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # bytes, lengths, counts

    def add_space_separated(self, data: bytes) -> None:
        """Count the space-separated tokens of UTF-8 text."""
        arr = np.frombuffer(data, dtype=np.uint8)
        starts, ends = _runs(arr != SPACE)
        self._add(arr, starts, ends - starts)

    def add_words(self, data: bytes, do_lower_case: bool, rest: TokenCounter) -> None:
        """Google's BasicTokenizer on the ASCII characters of UTF-8 text: ASCII control
        characters removed, split on ASCII whitespace, ASCII lowercased, ASCII punctuation
        split off. The words made of ASCII alone are counted here, the other tokens in `rest`
        for the caller to finish (other characters may be whitespace, punctuation, accents...).

        Exact unless do_lower_case and the text has a capital sigma, whose lowercase depends
        on its neighbours (Final_Sigma; an apostrophe or a period next to it counts), so that
        splitting off punctuation first could change it: count such text with
        add_space_separated instead."""
        kind_of = _byte_kinds()
        arr = np.frombuffer(data, dtype=np.uint8)
        kind = np.take(kind_of, arr)  # np.take: 2.5x faster than indexing here
        keep = kind != REMOVED
        if not keep.all():
            arr, kind = arr[keep], kind[keep]
        if do_lower_case:
            upper = (arr - np.uint8(ord("A"))) < np.uint8(26)
            arr = arr | (upper.view(np.uint8) << np.uint8(5))  # A-Z | 32 = a-z
        # A token starts at a letter after a non-letter and at every punctuation character, and
        # ends likewise; the padding on both sides counts as a space.
        k = np.full(len(kind) + 2, SPACE_LIKE, dtype=np.uint8)
        k[1:-1] = kind
        letter, punct = k == LETTER, k == PUNCT
        starts = np.flatnonzero(punct[1:-1] | (letter[1:-1] & ~letter[:-2]))
        ends = np.flatnonzero(punct[1:-1] | (letter[1:-1] & ~letter[2:])) + 1
        if data.isascii():
            self._add(arr, starts, ends - starts)
            return
        high = np.zeros(len(arr) + 1, dtype=np.int32)  # bytes over 127 before i
        np.cumsum(arr >= 128, dtype=np.int32, out=high[1:])
        other = high[ends] > high[starts]
        padded = _padded(arr)
        self._add(arr, starts[~other], ends[~other] - starts[~other], padded=padded)
        rest._add(arr, starts[other], ends[other] - starts[other], padded=padded)

    def add_lines(self, data: bytes, weights: np.ndarray) -> None:
        """Count the space-separated tokens of newline-separated lines of UTF-8 text, each
        occurrence weighted by its line's weight (a line, a distinct token's normalized words;
        its weight, how often that token occurs)."""
        arr = np.frombuffer(data, dtype=np.uint8)
        starts, ends = _runs((arr != SPACE) & (arr != NEWLINE))
        line = np.searchsorted(np.flatnonzero(arr == NEWLINE), starts)
        self._add(arr, starts, ends - starts, weights[line])

    def to_counter(self) -> Counter[str]:
        tokens, counts = self.result()
        return Counter(dict(zip(tokens, counts.tolist(), strict=True)))

    def result(self) -> tuple[list[str], np.ndarray]:
        """The distinct tokens and their counts, in no particular order but the same on
        every run."""
        keys, key_counts = _merge_keys(self._keys, self._key_counts)
        if self._long:
            parts = list(zip(*self._long, strict=True))
            arr, lengths, counts = (np.concatenate(p) for p in parts)
            starts = np.cumsum(lengths) - lengths
            arr, lengths, counts = _merge_long(arr, starts, lengths, counts, self.hash_seed)
        else:
            arr = np.zeros(0, dtype=np.uint8)
            lengths = counts = np.zeros(0, dtype=np.int64)
        tokens = _decode_keys(keys) + _decode_packed(arr, lengths)
        return tokens, np.concatenate([key_counts, counts]).astype(np.int64)

    def _add(
        self,
        arr: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        weights: np.ndarray | None = None,
        padded: np.ndarray | None = None,
    ) -> None:
        if len(starts) == 0:
            return
        padded = _padded(arr) if padded is None else padded
        window = _windows(padded)
        short = lengths <= 7
        keys = np.take(window, starts[short]) & np.take(MASKS, lengths[short])
        keys |= lengths[short].astype(np.uint64) << np.uint64(56)
        if weights is None:
            keys, key_counts = np.unique(keys, return_counts=True)
        else:
            keys, inverse = np.unique(keys, return_inverse=True)
            key_counts = np.bincount(
                inverse.reshape(-1), weights=weights[short], minlength=len(keys)
            ).astype(np.int64)  # exact: float64 holds integers up to 2**53
        self._keys.append(keys)
        self._key_counts.append(key_counts)
        if not short.all():
            long = ~short
            long_weights = None if weights is None else weights[long]
            merged = _merge_long(
                arr, starts[long], lengths[long], long_weights, self.hash_seed, padded
            )
            self._long.append(merged)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the runs of True in mask."""
    padded = np.zeros(len(mask) + 2, dtype=bool)
    padded[1:-1] = mask
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2]


@functools.cache
def _byte_kinds() -> np.ndarray:
    """Per byte of UTF-8: its kind to BERT (LETTER, SPACE_LIKE, REMOVED, PUNCT), for ASCII
    from the tokenizer's own character classes; bytes of other characters are LETTER here."""
    cps = np.arange(128, dtype=np.int64)
    masks = char_classes(cps, categories(cps))
    kind = np.full(256, LETTER, dtype=np.uint8)
    kind[:128][masks["removed"]] = REMOVED
    kind[:128][masks["whitespace"]] = SPACE_LIKE
    kind[SPACE] = SPACE_LIKE
    kind[:128][masks["punctuation"]] = PUNCT
    return kind


def _padded(arr: np.ndarray) -> np.ndarray:
    """arr and 8 zero bytes, for _windows."""
    padded = np.zeros(len(arr) + 8, dtype=np.uint8)
    padded[: len(arr)] = arr
    return padded


def _windows(padded: np.ndarray) -> np.ndarray:
    """window[i]: the 8 bytes from i as a little-endian number (byte k of a token is bits
    8k..8k+7); padded ends with 8 zero bytes."""
    return np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded.data, strides=(1,))


def _merge_keys(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    totals = np.bincount(inverse.reshape(-1), weights=np.concatenate(counts), minlength=len(unique))
    return unique, totals.astype(np.int64)  # exact: float64 holds integers up to 2**53


def _decode_keys(keys: np.ndarray) -> list[str]:
    """Tokens of at most 7 bytes back from their keys."""
    n = len(keys)
    if n == 0:
        return []
    lengths = (keys >> np.uint64(56)).astype(np.int64)
    out = np.zeros((n, 9), dtype=np.uint8)
    out[:, :8] = keys.astype("<u8").view(np.uint8).reshape(n, 8)
    out[np.arange(n), lengths] = SPACE  # a space after each token
    wanted = np.arange(9) <= lengths[:, None]
    return out[wanted].tobytes().decode("utf-8").split(" ")[:-1]


def _chunk_values(
    window: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8-byte chunks of each span (the last one masked to the span's end), each chunk's
    position in its span, and where each span's chunks begin."""
    chunks = (lengths + 7) // 8
    offsets = np.concatenate([[0], np.cumsum(chunks)])
    position = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], chunks)
    left = np.repeat(lengths, chunks) - 8 * position  # bytes of the span from this chunk on
    values = np.take(window, np.repeat(starts, chunks) + 8 * position)
    values &= np.take(MASKS, np.minimum(left, 8))
    return values, position, offsets


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of 64-bit values that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _merge_long(
    arr: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    counts: np.ndarray | None,
    seed: int,
    padded: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct spans arr[starts[i]:starts[i]+lengths[i]] (8 bytes or more; weighted by
    counts, or 1 each), packed back to back: (bytes, lengths, counts). Hashed, counted, and
    verified chunk by chunk against the first span of each hash."""
    window = _windows(_padded(arr) if padded is None else padded)
    values, position, offsets = _chunk_values(window, starts, lengths)
    weights = np.random.default_rng(seed).integers(
        0, 2**64, size=int(position.max()) + 2, dtype=np.uint64
    )
    with np.errstate(over="ignore"):
        terms = _mix(values) * np.take(weights, position)
        hashes = np.add.reduceat(terms, offsets[:-1]) + lengths.astype(np.uint64) * weights[-1]
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rep = first[inverse]  # the first span with the same hash
    same = (lengths == lengths[rep]).all()
    if same:
        rep_values, _, _ = _chunk_values(window, starts[rep], lengths)
        same = (values == rep_values).all()
    if not same:  # two different spans share a hash: count the sure and slow way
        return _count_with_counter(arr, starts, lengths, counts)
    totals = np.bincount(inverse, weights=counts, minlength=len(first)).astype(np.int64)
    return _gather(arr, starts[first], lengths[first]), lengths[first], totals


def _gather(arr: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The spans' bytes back to back."""
    position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(lengths) - lengths, lengths
    )
    return arr[np.repeat(starts, lengths) + position]


def _decode_packed(arr: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Tokens packed back to back as strings: a space inserted after each, decoded at once."""
    out = np.full(len(arr) + len(lengths), SPACE, dtype=np.uint8)
    out[np.arange(len(arr)) + np.repeat(np.arange(len(lengths)), lengths)] = arr
    return out.tobytes().decode("utf-8").split(" ")[:-1]


def _count_with_counter(
    arr: np.ndarray, starts: np.ndarray, lengths: np.ndarray, counts: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = arr.tobytes()
    totals: Counter[bytes] = Counter()
    weights = [1] * len(starts) if counts is None else counts.tolist()
    for s, n, c in zip(starts.tolist(), lengths.tolist(), weights, strict=True):
        totals[data[s : s + n]] += c
    packed = np.frombuffer(b"".join(totals), dtype=np.uint8)
    sizes = np.fromiter(map(len, totals), dtype=np.int64, count=len(totals))
    return packed, sizes, np.fromiter(totals.values(), dtype=np.int64, count=len(totals))
