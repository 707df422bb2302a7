"""Google's masked-LM + next-sentence instance creation, as pure functions over token ids.

This is create_pretraining_data.py's algorithm with one explicit `random.Random` passed down and
the random calls made in exactly Google's order, so that the same documents and seed give
Google's instances, record for record. Nothing here does I/O or reads a global; documents
arrive as lists of sentences, each a list of token ids.

Working on ids rather than token strings changes nothing observable: Google's random
replacement draws `vocab_words[randint(0, len(vocab_words) - 1)]` from the vocab in file order,
which is the id of the drawn word, and the tokenizer never produces [CLS]/[SEP] from text.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

Document = Sequence[Sequence[int]]  # sentences of token ids
Truncate = Callable[[list[int], list[int], int, random.Random], None]


@dataclass(frozen=True)
class InstanceParams:
    """The knobs of the algorithm (Google's flag names)."""

    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    do_whole_word_mask: bool = False


@dataclass(frozen=True)
class VocabIds:
    """What the algorithm needs of the vocabulary."""

    size: int
    cls_id: int
    sep_id: int
    mask_id: int
    unk_id: int
    is_continuation: Sequence[bool]  # per id: the piece starts with "##"

    @classmethod
    def from_tokens(cls, tokens: Sequence[str]) -> VocabIds:
        index = {t: i for i, t in enumerate(tokens)}
        return cls(len(tokens), index["[CLS]"], index["[SEP]"], index["[MASK]"], index["[UNK]"],
                   [t.startswith("##") for t in tokens])  # fmt: skip


@dataclass(frozen=True)
class Instance:
    """One training example: [CLS] A [SEP] B [SEP], masked, with its labels."""

    input_ids: list[int]  # after masking
    segment_ids: list[int]
    is_random_next: bool
    masked_lm_positions: list[int]  # sorted
    masked_lm_ids: list[int]  # the original ids at those positions


def create_training_instances(
    documents: list[list[list[int]]],
    params: InstanceParams,
    vocab: VocabIds,
    dupe_factor: int,
    rng: random.Random,
) -> list[Instance]:
    """Google's whole run: shuffle documents, dupe_factor passes, shuffle all instances.

    Holds every instance in memory, as Google's script does; `documents` must already have
    empty sentences and documents removed."""
    rng.shuffle(documents)
    instances: list[Instance] = []
    for _ in range(dupe_factor):
        for index in range(len(documents)):
            instances += create_instances_from_document(documents, index, params, vocab, rng)
    rng.shuffle(instances)
    return instances


def create_instances_from_document(
    documents: Sequence[Document],
    document_index: int,
    params: InstanceParams,
    vocab: VocabIds,
    rng: random.Random,
) -> list[Instance]:
    """Google's instances of one document: each pair from `document_pairs`, masked at once with
    the same rng (the generator pauses while the pair is masked, so the calls interleave in
    Google's order)."""
    instances = []
    for tokens_a, tokens_b, is_random_next in document_pairs(
        documents, document_index, params.max_seq_length, params.short_seq_prob, rng
    ):
        ids = [vocab.cls_id, *tokens_a, vocab.sep_id, *tokens_b, vocab.sep_id]
        segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
        masked, positions, labels = create_masked_lm_predictions(ids, params, vocab, rng)
        instances.append(Instance(masked, segment_ids, is_random_next, positions, labels))
    return instances


def document_pairs(
    documents: Sequence[Document],
    document_index: int,
    max_seq_length: int,
    short_seq_prob: float,
    rng: random.Random,
    truncate: Truncate | None = None,
) -> Iterator[tuple[list[int], list[int], bool]]:
    """The (segment A, segment B, is_random_next) pairs of one document, truncated to fit.

    We DON'T just concatenate all of the tokens of a document into one long sequence and cut
    it at arbitrary points, because then the next-sentence task would be too easy: segments are
    whole sentences, and targets are sometimes short (short_seq_prob) to reduce the mismatch
    between pretraining and the short sequences of fine-tuning. `truncate` defaults to Google's
    truncate_seq_pair."""
    truncate = truncate or truncate_seq_pair
    document = documents[document_index]
    max_num_tokens = max_seq_length - 3  # [CLS], [SEP], [SEP]
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    chunk: list[Sequence[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_seq_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = list(itertools.chain.from_iterable(chunk[:a_end]))
            tokens_b: list[int] = []
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                target_b_length = target_seq_length - len(tokens_a)
                # Ten tries to draw another document (the same one can come back on a tiny
                # corpus; Google accepts that too).
                for _ in range(10):
                    random_index = rng.randint(0, len(documents) - 1)
                    if random_index != document_index:
                        break
                random_document = documents[random_index]
                start = rng.randint(0, len(random_document) - 1)
                for sentence in random_document[start:]:
                    tokens_b += sentence
                    if len(tokens_b) >= target_b_length:
                        break
                # The unused segments of this chunk are "put back" for the next instance.
                i -= len(chunk) - a_end
            else:
                is_random_next = False
                tokens_b = list(itertools.chain.from_iterable(chunk[a_end:]))
            truncate(tokens_a, tokens_b, max_num_tokens, rng)
            assert tokens_a and tokens_b, "empty segment: documents must hold no empty sentence"
            yield tokens_a, tokens_b, is_random_next
            chunk = []
            chunk_length = 0
        i += 1


@dataclass
class PairRanges:
    """Instances as token ranges: segment A is flat[a_start : a_start + a_len], B likewise."""

    a_start: list[int]
    a_len: list[int]
    b_start: list[int]
    b_len: list[int]
    is_random_next: list[int]


def pair_ranges(
    bounds: list[list[int]],
    max_seq_length: int,
    short_seq_prob: float,
    dupe_factor: int,
    rng: random.Random,
) -> PairRanges:
    """`document_pairs` with `truncate_seq_pair_fast` over every document, dupe_factor passes
    (documents shuffled first), computed on sentence boundaries instead of token lists.

    bounds[d] holds where document d's sentences start in one flat token array, and where
    the last ends: the sentences of a document are contiguous there, so a segment (whole
    sentences, trimmed at its ends) is one range. The random calls and their order are
    document_pairs' exactly, so the instances are the same (tested); what goes is the
    per-token work, which made this loop the largest cost of static-masking data."""
    rng.shuffle(bounds)
    out = PairRanges([], [], [], [], [])
    a_starts, a_lens, b_starts, b_lens, randoms = (
        out.a_start,
        out.a_len,
        out.b_start,
        out.b_len,
        out.is_random_next,
    )
    random_, getrandbits, bisect_left = rng.random, rng.getrandbits, bisect.bisect_left

    def randint(a: int, b: int) -> int:
        """rng.randint(a, b), drawing exactly as CPython does (randrange -> _randbelow)."""
        n = b - a + 1
        k = n.bit_length()
        r = getrandbits(k)
        while r >= n:
            r = getrandbits(k)
        return a + r

    max_num_tokens = max_seq_length - 3
    last_doc = len(bounds) - 1
    for _ in range(dupe_factor):
        for index, doc in enumerate(bounds):
            target_seq_length = max_num_tokens
            if random_() < short_seq_prob:
                target_seq_length = randint(2, max_num_tokens)
            n = len(doc) - 1  # sentences
            first = 0  # the chunk's first sentence
            i = 0
            while i < n:
                if i != n - 1 and doc[i + 1] - doc[first] < target_seq_length:
                    i += 1
                    continue
                size = i - first + 1
                a_end = first + (randint(1, size - 1) if size >= 2 else 1)
                a_start, a_len = doc[first], doc[a_end] - doc[first]
                if size == 1 or random_() < 0.5:
                    randoms.append(1)
                    target_b_length = target_seq_length - a_len
                    for _ in range(10):
                        random_index = randint(0, last_doc)
                        if random_index != index:
                            break
                    other = bounds[random_index]
                    start = randint(0, len(other) - 2)
                    # sentences from start until the length reaches target_b_length (one at least)
                    stop = bisect_left(other, other[start] + target_b_length, start + 1)
                    stop = min(stop, len(other) - 1)
                    b_start, b_len = other[start], other[stop] - other[start]
                    i = a_end - 1  # the chunk's unused sentences are put back
                else:
                    randoms.append(0)
                    b_start, b_len = doc[a_end], doc[i + 1] - doc[a_end]
                excess = a_len + b_len - max_num_tokens
                if excess > 0:  # truncate_seq_pair_fast on the ranges
                    ka, kb = _trim_counts(a_len, b_len, excess)
                    if ka:
                        a_start += getrandbits(ka).bit_count()
                        a_len -= ka
                    if kb:
                        b_start += getrandbits(kb).bit_count()
                        b_len -= kb
                a_starts.append(a_start)
                a_lens.append(a_len)
                b_starts.append(b_start)
                b_lens.append(b_len)
                first = i + 1
                i += 1
    return out


def _trim_counts(la: int, lb: int, excess: int) -> tuple[int, int]:
    """How many tokens truncate_seq_pair takes from A and from B (chance decides only which
    end): the longer shrinks to the shorter's length, then they alternate, B first."""
    gap = abs(la - lb)
    if excess <= gap:
        return (excess, 0) if la > lb else (0, excess)
    rest = excess - gap
    return (gap if la > lb else 0) + rest // 2, (gap if lb >= la else 0) + rest - rest // 2


def create_masked_lm_predictions(
    ids: list[int], params: InstanceParams, vocab: VocabIds, rng: random.Random
) -> tuple[list[int], list[int], list[int]]:
    """Mask ~masked_lm_prob of the tokens: 80% [MASK], 10% kept, 10% a random word.

    With whole-word masking, a `##` piece joins the previous candidate so that all pieces of
    a word are masked together. Returns (masked ids, sorted positions, original ids)."""
    candidates: list[list[int]] = []
    for i, token in enumerate(ids):
        if token == vocab.cls_id or token == vocab.sep_id:
            continue
        if params.do_whole_word_mask and candidates and vocab.is_continuation[token]:
            candidates[-1].append(i)
        else:
            candidates.append([i])
    rng.shuffle(candidates)

    output = list(ids)
    num_to_predict = min(
        params.max_predictions_per_seq, max(1, round(len(ids) * params.masked_lm_prob))
    )
    masked: list[int] = []
    covered: set[int] = set()
    for group in candidates:
        if len(masked) >= num_to_predict:
            break
        # A whole word that would overshoot the budget is skipped, not cut.
        if len(masked) + len(group) > num_to_predict:
            continue
        if any(i in covered for i in group):
            continue
        for i in group:
            covered.add(i)
            if rng.random() < 0.8:
                output[i] = vocab.mask_id
            elif rng.random() < 0.5:
                output[i] = ids[i]
            else:
                output[i] = rng.randint(0, vocab.size - 1)
            masked.append(i)
    masked.sort()
    return output, masked, [ids[i] for i in masked]


def truncate_seq_pair(
    tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random
) -> None:
    """Trim the longer segment (B on a tie) one token at a time, from the front or the back at
    random, so that truncation does not always cut the same end, until both fit."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert trunc, "cannot truncate an empty segment"
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def truncate_seq_pair_fast(
    tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random
) -> None:
    """truncate_seq_pair's result distribution in O(1) random draws (the default mode's).

    Which segment loses how many tokens does not depend on chance: the longer one shrinks to
    the shorter's length, then they alternate, B first. Each removal takes the front or the
    back with probability 1/2, so the number taken from the front is Binomial(k, 1/2)."""
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return
    ka, kb = _trim_counts(len(tokens_a), len(tokens_b), excess)
    for tokens, k in ((tokens_a, ka), (tokens_b, kb)):
        if k:
            front = rng.getrandbits(k).bit_count()
            del tokens[len(tokens) - (k - front) :]
            del tokens[:front]
