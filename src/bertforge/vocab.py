"""`bertforge vocab`: train a WordPiece vocabulary in Google's vocab.txt layout.

Two trainers, both well-kept libraries, neither re-implemented here:
- wordpiece: Hugging Face's WordPieceTrainer. On its own it is not deterministic: symbols of
  the form `##x` get ids in hash-map order, and ids break ties between equally frequent
  merges. We fix every symbol id before training by computing the alphabet ourselves and
  passing it as `initial_alphabet` (chars) and as special tokens (`##x`), which makes the
  output byte-identical from run to run and also guarantees that every kept character exists
  both word-initially and as a continuation.
- sentencepiece: the seed workflow done right. SentencePiece (bpe or unigram) trains on text
  that went through BERT's own normalization and punctuation splitting, then the pieces are
  converted (`▁x` -> `x`, `x` -> `##x`) without the old converter's junk (`<s>`, `##[SEP]`,
  the bare `▁`, empty lines, characters that only exist as `##x`).

The corpus is streamed once. On the way we count characters (for the alphabet), pick held-out
documents, and keep a uniform reservoir sample of at most `max_sentences` training sentences
(memory is bounded by that number, whatever the corpus size). The words of the sample are
counted here, not by Hugging Face's trainer, which spends ~1 us per word occurrence counting
(its normalizer tracks alignments) and ~7 us per distinct word: on two cores, with numpy
(`wordcount`: words made of ASCII alone are normalized and counted there; tokens with other
characters are normalized once per distinct token by `basic_words`, Google's BasicTokenizer
tested against it), and the trainer is fed the TRAIN_WORDS most frequent words with their
counts scaled to about TRAIN_OCCURRENCES occurrences (it takes text, not counts). The
held-out documents measure the result: [UNK] rate, pieces per word and the share of the
vocabulary in use.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import os
import random
import sys
import tempfile
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.config import (
    VocabConfig,
    VocabExtendConfig,
    changed_settings,
    config_to_dict,
    describe_changes,
)
from bertforge.corpus import (
    CorpusStats,
    InputFile,
    Progress,
    check_output_apart,
    corpus_change,
    corpus_notes,
    corpus_warnings,
    iter_documents,
    progress_bar,
    require_text,
    resolve_inputs,
)
from bertforge.errors import UserError
from bertforge.fileio import (
    begin_output,
    edited_outputs,
    finish_output,
    locked_output,
    prepare_output_dir,
    read_manifest,
    write_manifest,
)
from bertforge.tokenization import (
    MAX_INPUT_CHARS_PER_WORD,
    SPECIALS,
    UNK,
    UNUSED,
    Vocab,
    basic_words,
    google_layout,
    load_vocab,
    save_tokenizer_files,
    wordpiece_ids,
    wordpiece_tokenizer,
)
from bertforge.wordcount import TokenCounter
from bertforge.workers import ignore_ctrl_c, usable_cpus

BATCH_LINES = 2000
HELDOUT_MAX_SHARE = 0.05  # never hold out more than 5% of the documents
SP_MAX_SENTENCE_BYTES = 1 << 16
TRAIN_WORDS = 80_000  # distinct words the WordPiece trainer sees
ACCENT_NOTE_SHARE = 0.005  # of the corpus's letters, changed by stripping accents: a note
NFC_NOTE_SHARE = 0.01  # of the sampled sentences, not in Unicode's composed form: a note
TRAIN_OCCURRENCES = 1_500_000  # word occurrences it is fed, about
COUNT_CHUNK = 1 << 19  # characters counted at once (small chunks stay in cache: faster)


@dataclass
class Scan:
    """What the first pass over the corpus learned."""

    stats: CorpusStats
    char_counts: np.ndarray  # (0x110000,) counts of normalized code points
    notes: list[str]  # on casing: accent stripping changes many letters, Turkish I
    heldout_docs: set[int]
    heldout: list[str]
    train_sentences: int  # in the corpus, held-out documents excluded
    sample: list[str]  # the training sentences the trainer sees


@dataclass
class Quality:
    """Vocabulary quality measured on held-out text."""

    measured_on: str
    sentences: int = 0
    words: int = 0
    tokens: int = 0
    unk_tokens: int = 0
    distinct_ids: int = 0
    vocab_size: int = 0

    def as_dict(self) -> dict:
        return {
            "measured_on": self.measured_on,
            "sentences": self.sentences,
            "words": self.words,
            "unk_rate": self.unk_tokens / max(1, self.tokens),
            "pieces_per_word": self.tokens / max(1, self.words),
            "vocab_used": self.distinct_ids / max(1, self.vocab_size),
        }


@dataclass
class VocabResult:
    """What `train_vocab` produced, for the CLI summary and for tests."""

    output: Path
    tokens: list[str]
    stats: CorpusStats
    quality: Quality
    alphabet_size: int
    sampled_sentences: int
    padded_unused: int
    warnings: list[str] = field(default_factory=list)


@locked_output("vocab")
def train_vocab(cfg: VocabConfig) -> VocabResult:
    """Run the vocab stage: read the corpus, train, write vocab + tokenizer files + manifest."""
    check_output_apart(cfg.output, cfg.input)
    out = prepare_output_dir(cfg.output, "vocab", cfg.overwrite, "--output")
    inputs = resolve_inputs(cfg.input)
    if not cfg.overwrite:
        check_replacing(out, config_to_dict(cfg), VocabConfig, inputs)
    begin_output(out, "vocab")
    scan = scan_corpus(inputs, cfg)
    require_text(scan.stats, cfg.input)
    alphabet = choose_alphabet(scan.char_counts, cfg.limit_alphabet)
    budget = cfg.vocab_size - cfg.num_unused - len(SPECIALS)
    if 2 * len(alphabet) > budget:
        raise UserError(
            f"--vocab-size {cfg.vocab_size} leaves {max(budget, 0)} pieces after the "
            f"{len(SPECIALS)} special tokens and {cfg.num_unused} [unused] slots, fewer than "
            f"the {2 * len(alphabet)} that the corpus's {len(alphabet)} characters need (each "
            "as x and ##x); raise --vocab-size to at least "
            f"{cfg.vocab_size - budget + 2 * len(alphabet)}, or lower --limit-alphabet or "
            "--num-unused."
        )
    if cfg.algorithm == "wordpiece":
        pieces = train_wordpiece(count_words(scan.sample, cfg), alphabet, budget, cfg)
    else:
        batches = (
            scan.sample[i : i + BATCH_LINES] for i in range(0, len(scan.sample), BATCH_LINES)
        )
        pieces = train_sentencepiece(batches, alphabet, budget, cfg, out)
    stats = scan.stats.as_dict()
    notes = [f"note: {note}." for note in corpus_notes(stats)]
    warnings = [*corpus_warnings(stats), *notes, *scan.notes]
    padded = budget - len(pieces)
    if padded > 0:
        extra = [f"[unused{cfg.num_unused + i}]" for i in range(padded)]
        pieces = pieces + extra
        cut = len(token_chars(scan.char_counts)) - len(alphabet)
        why = (
            f" --limit-alphabet {cfg.limit_alphabet} left out {cut:,} rarer characters of the "
            "corpus, [UNK] wherever they occur: raise it to give them pieces instead."
            if cut > 0 else ""
        )  # fmt: skip
        warnings.append(
            f"warning: the corpus supports only {budget - padded} pieces; filled the remaining "
            f"{padded} lines with [unused] slots to keep --vocab-size {cfg.vocab_size}.{why}"
        )
    tokens = google_layout(pieces[:budget], cfg.num_unused)
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    outputs = save_tokenizer_files(out, tokens, cfg.do_lower_case, cfg.strip_accents)
    quality = measure_quality(tokens, cfg, scan.heldout)
    sampled = len(scan.sample)
    write_manifest(
        out,
        "vocab",
        config_to_dict(cfg),
        inputs=[f.describe() for f in inputs],
        counts={
            **scan.stats.as_dict(),
            "vocab_size": len(tokens),
            "alphabet": len(alphabet),
            "train_sentences": scan.train_sentences,
            "sampled_sentences": sampled,
            "heldout_documents": len(scan.heldout_docs),
            "padded_unused": max(0, padded),
        },
        outputs=outputs,
        extra={"quality": quality.as_dict(), "warnings": warnings},
    )
    finish_output(out)
    return VocabResult(
        out, tokens, scan.stats, quality, len(alphabet), sampled, max(0, padded), warnings
    )


def scan_corpus(inputs: Sequence[InputFile], cfg: VocabConfig) -> Scan:
    """One pass: character counts, held-out documents, a reservoir sample of sentences.

    Held-out documents are the ones with the smallest random priority (rng seeded by cfg.seed)
    that fit in cfg.heldout_sentences, at most 5% of all documents: spread evenly over the
    corpus, the same on every run, and found in one pass with bounded memory (a heap). The
    training sample is a uniform reservoir (Algorithm R, its own rng) of at most
    cfg.max_sentences sentences; held-out sentences are taken out of it at the end.
    """
    stats = CorpusStats()
    counts = np.zeros(0x110000, dtype=np.int64)
    rng = random.Random(cfg.seed)
    sample_rng = random.Random(cfg.seed + 1)
    cap = cfg.heldout_sentences
    heap: list[tuple[float, int, list[str]]] = []  # (-priority, doc index, sentences)
    whole: list[tuple[int, list[str]]] = []  # the reservoir while every document fits
    indices: list[int] = []  # then the reservoir sentence by sentence: document index,
    reservoir: list[str] = []  # and sentence
    seen = held = counted = 0  # sentences seen, sentences held out, input bytes counted
    batch: list[str] = []
    bar = progress_bar(inputs, cfg.progress, "scan")
    progress = Progress(callbacks=[bar.update] if bar else [])
    for index, doc in enumerate(
        iter_documents(
            inputs,
            stats,
            strict_utf8=cfg.strict_utf8,
            text_field=cfg.text_field,
            progress=progress,
        )
    ):
        batch += doc
        if len(batch) >= BATCH_LINES or stats.bytes - counted >= COUNT_CHUNK:
            count_chars(batch, counts)  # a few MB at most: its temporaries are 12x the text
            batch, counted = [], stats.bytes
        if seen + len(doc) <= cfg.max_sentences and not reservoir:  # still filling it
            whole.append((index, doc))
            seen += len(doc)
        else:
            if whole:  # from now on, sentence by sentence (Algorithm R)
                indices = [i for i, d in whole for _ in d]
                reservoir = [sentence for _, d in whole for sentence in d]
                whole = []
            for sentence in doc:
                if seen < cfg.max_sentences:
                    indices.append(index)
                    reservoir.append(sentence)
                else:
                    j = sample_rng.randrange(seen + 1)
                    if j < cfg.max_sentences:
                        indices[j], reservoir[j] = index, sentence
                seen += 1
        if cap and len(doc) <= cap:
            priority = rng.random()
            if held + len(doc) > cap and heap and priority > -heap[0][0]:
                continue  # it would be the first to leave the full heap
            heapq.heappush(heap, (-priority, index, doc))
            held += len(doc)
            while held > cap:
                held -= len(heapq.heappop(heap)[2])
    count_chars(batch, counts)
    if bar:
        bar.close()
    # Keep at most 5% of the documents: the ones with the smallest priority.
    kept = sorted(heap, reverse=True)[: int(stats.documents * HELDOUT_MAX_SHARE)]
    heldout_docs = {index for _, index, _ in kept}
    heldout = [s for _, _, doc in sorted(kept, key=lambda x: x[1]) for s in doc]
    normalized = normalize_counts(counts, cfg)
    if whole:
        sample = [s for index, doc in whole if index not in heldout_docs for s in doc]
    else:
        pairs = zip(indices, reservoir, strict=True)
        sample = [s for index, s in pairs if index not in heldout_docs]
    found = (accent_note(counts, cfg), dotless_i_note(counts, cfg), nfc_note(sample, cfg))
    notes = [n for n in found if n]
    train_sentences = stats.sentences - len(heldout)
    return Scan(stats, normalized, notes, heldout_docs, heldout, train_sentences, sample)


def count_chars(lines: list[str], counts: np.ndarray) -> None:
    """Add the code points of lines to counts (vectorized). ASCII text is counted two bytes
    at a time, half the work of one code point at a time."""
    text = "".join(lines)
    if not text:
        return
    if text.isascii():
        data = text.encode("ascii")
        pairs = np.bincount(np.frombuffer(data, np.uint16, len(data) // 2), minlength=1 << 16)
        pairs = pairs.reshape(256, 256)  # the two bytes of a pair, in the byte order's order
        counts[:256] += pairs.sum(axis=0) + pairs.sum(axis=1)
        if len(data) % 2:
            counts[data[-1]] += 1
        return
    found = np.bincount(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
    counts[: found.shape[0]] += found


def normalize_counts(raw: np.ndarray, cfg: VocabConfig) -> np.ndarray:
    """Counts of the characters that normalization makes of the raw ones.

    Normalization maps each character independently except Σ, which lowercases to σ or to
    the final ς depending on its neighbours; both are counted then."""
    out = np.zeros_like(raw)
    present = [cp for cp in np.flatnonzero(raw).tolist() if cp != ord("\n")]
    lines = basic_words([chr(cp) for cp in present], cfg.do_lower_case, cfg.strip_accents)
    for cp, line in zip(present, lines, strict=True):
        for n in line.replace(" ", "") + ("ς" if cfg.do_lower_case and cp == ord("Σ") else ""):
            out[ord(n)] += raw[cp]
    return out


def accent_note(raw: np.ndarray, cfg: VocabConfig) -> str | None:
    """A note when lowercasing's accent stripping, taken by default as in Google's uncased
    models, changes at least ACCENT_NOTE_SHARE of the corpus's letters in either of its two
    ways: it takes marks off (Turkish ç ş ğ ö ü, Norwegian å, German umlauts, French accents
    become their bare letters) or splits letters into parts (NFD: Korean syllables into jamo),
    in the vocabulary and in every later stage, which the model cannot undo. None where the
    user chose (`--strip-accents` either way, `--cased`) or such letters are rare. A combining
    mark written on its own (decomposed text) is a letter that loses it."""
    if not cfg.do_lower_case or cfg.strip_accents is not None:
        return None
    present = [
        cp
        for cp in np.flatnonzero(raw).tolist()
        if chr(cp).isalpha() or unicodedata.category(chr(cp)) == "Mn"
    ]
    chars = [chr(cp) for cp in present]
    kept = basic_words(chars, True, False)
    stripped = basic_words(chars, True, True)
    merged: Counter[str] = Counter()
    split: Counter[str] = Counter()
    for cp, k, t in zip(present, kept, stripped, strict=True):
        if k == t:
            continue
        if not t:
            merged["combining marks dropped"] += int(raw[cp])
        elif t == unicodedata.normalize("NFD", k):  # nothing taken off: only decomposed
            split[f"{k}→{' '.join(t)}"] += int(raw[cp])
        else:
            merged[f"{k}→{t}"] += int(raw[cp])
    letters = int(raw[present].sum())
    what = []
    if letters and merged.total() >= ACCENT_NOTE_SHARE * letters:
        shown = ", ".join(change for change, _ in merged.most_common(6))
        what.append(
            f"takes the marks off {merged.total() / letters:.1%} of the corpus's letters, "
            f"merging them with the bare ones ({shown})"
        )
    if letters and split.total() >= ACCENT_NOTE_SHARE * letters:
        shown = ", ".join(change for change, _ in split.most_common(3))
        what.append(
            f"splits {split.total() / letters:.1%} of the corpus's letters into their parts "
            f"({shown})"
        )
    if not what:
        return None
    return (
        f"note: lowercasing also strips accents (Google's uncased default), which "
        f"{' and '.join(what)}; every later stage keeps that. --no-strip-accents keeps them "
        "(--cased keeps case too); --strip-accents keeps this default without the note."
    )


def nfc_note(sample: Sequence[str], cfg: VocabConfig) -> str | None:
    """A note when at least NFC_NOTE_SHARE of the sampled sentences are not in Unicode's
    composed form (NFC): Norwegian å written as a + combining ring, as macOS and some tools
    write text. BERT's tokenizers do not compose (Google's and transformers' alike), so the
    vocabulary learns each letter twice over and text written composed, as most is, reads
    as other pieces. None where accents are stripped (lowercasing's default), which takes
    both forms apart alike."""
    if cfg.do_lower_case and cfg.strip_accents is not False:
        return None
    off = [s for s in sample if not unicodedata.is_normalized("NFC", s)]
    if not off or len(off) < NFC_NOTE_SHARE * len(sample):
        return None
    example = "letters written as a base letter and combining marks"
    text = off[0]
    for i in range(1, len(text)):
        pair = text[i - 1 : i + 1]
        if (
            unicodedata.category(text[i]).startswith("M")
            and unicodedata.normalize("NFC", pair) != pair
        ):
            example = (f'"{unicodedata.normalize("NFC", pair)}" written as "{text[i - 1]}" + '
                       f"U+{ord(text[i]):04X}")  # fmt: skip
            break
    return (
        f"note: {len(off):,} of the {len(sample):,} sampled sentences are not in Unicode's "
        f"composed form, NFC ({example}). BERT's tokenizers read a composed and a decomposed "
        "letter as different text, and most text a model sees later is composed: normalize "
        'the corpus to NFC first (Python: unicodedata.normalize("NFC", line); or uconv -x '
        "any-nfc), and the text you give the model alike."
    )


def dotless_i_note(raw: np.ndarray, cfg: VocabConfig) -> str | None:
    """A note when lowercasing meets Turkish or Azerbaijani text: dotless ı and dotted İ at
    least ACCENT_NOTE_SHARE of the letters, and capital I and İ at least a tenth of that.
    Unicode's lowercasing, which Google's and transformers' tokenizers share, makes I into i
    where these languages need ı, and İ into i with a combining dot above (plain i where
    accents are stripped): "IŞIK" and "ışık" become different words, in the vocabulary and
    in every later stage. A corpus lowercased by Turkish rules beforehand has few capitals
    left and gets no note."""
    if not cfg.do_lower_case:
        return None
    letters = int(sum(raw[cp] for cp in np.flatnonzero(raw).tolist() if chr(cp).isalpha()))
    dotless, dotted, capital = int(raw[ord("ı")]), int(raw[ord("İ")]), int(raw[ord("I")])
    if not letters or dotless + dotted < ACCENT_NOTE_SHARE * letters:
        return None
    if capital + dotted < ACCENT_NOTE_SHARE / 10 * letters:
        return None
    strips = cfg.strip_accents is not False
    example = '"IŞIK" becomes "isik" and "ışık" "ısık"' if strips else (
        '"IŞIK" becomes "işik" and "ışık" stays'
    )  # fmt: skip
    return (
        f"note: the corpus looks Turkish or Azerbaijani (ı and İ are "
        f"{(dotless + dotted) / letters:.1%} of its letters). Lowercasing, Unicode's as in "
        f"Google's and transformers' tokenizers, makes its {capital:,} I into i, not ı, and its "
        f"{dotted:,} İ into {'i' if strips else 'i and a combining dot'}: {example}, so one "
        "word gets two spellings. Lowercase the corpus with Turkish rules yourself (I→ı, "
        "İ→i) and every text the model will see, or train --cased, as Turkish models "
        "usually are."
    )


def choose_alphabet(counts: np.ndarray, limit: int) -> list[str]:
    """The `limit` most frequent characters (ties by code point), in code point order."""
    chars = token_chars(counts)
    chars.sort(key=lambda c: (-int(counts[c]), c))
    return [chr(c) for c in sorted(chars[:limit])]


def token_chars(counts: np.ndarray) -> list[int]:
    """The code points of `counts` that can be tokens: whitespace (to Python, which also
    strips vocab.txt lines) and `is_unsafe` characters never are."""
    present = np.flatnonzero(counts)
    return [int(c) for c in present if chr(int(c)).strip() and not is_unsafe(chr(int(c)))]


def is_unsafe(ch: str) -> bool:
    """Characters that cannot stand in a vocab.txt line or that the tokenizer removes."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") or ch == "\ufffd"


def count_words(sentences: Sequence[str], cfg: VocabConfig) -> Counter[str]:
    """How often each word (BERT-normalized, punctuation split off) occurs in the sentences.

    Where the platform can fork, a child process counts the second half while this one counts
    the first (one core counts ~7 M words a second on the development machine). The child gets
    a few large strings, not the sentences: touching every sentence object would make it copy
    the memory pages they live on."""
    texts = joined(sentences)
    half = len(texts) // 2
    if half < 1 or usable_cpus() < 2 or sys.platform != "linux":
        return count_texts(texts, cfg).to_counter()
    global _FORK_INPUT
    _FORK_INPUT = (texts[half:], cfg)
    try:
        with multiprocessing.get_context("fork").Pool(1, ignore_ctrl_c) as pool:
            other = pool.apply_async(_count_forked)
            words = count_texts(texts[:half], cfg).to_counter()
            words.update(other.get())
    finally:
        _FORK_INPUT = None
    return words


_FORK_INPUT: tuple[list[str], VocabConfig] | None = None  # read by the forked child


def joined(sentences: Sequence[str]) -> list[str]:
    """count_texts' input: sentences joined by spaces, a text ending at BATCH_LINES sentences or
    at the sentence that reaches COUNT_CHUNK characters (long lines keep memory bounded)."""
    return [" ".join(sentences[a:b]) for a, b in chunk_bounds(sentences, BATCH_LINES)]


def chunk_bounds(strings: Sequence[str], most: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive runs of strings, each ending at `most` strings or at the
    string that reaches COUNT_CHUNK characters (counting a separator after each)."""
    ends = np.cumsum(np.fromiter(map(len, strings), np.int64, len(strings)) + 1)
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < len(strings):
        before = int(ends[start - 1]) if start else 0
        reach = int(np.searchsorted(ends, before + COUNT_CHUNK)) + 1
        end = min(start + most, reach, len(strings))
        bounds.append((start, end))
        start = end
    return bounds


def _count_forked() -> Counter[str]:
    assert _FORK_INPUT is not None
    return count_texts(*_FORK_INPUT).to_counter()


def count_texts(texts: Sequence[str], cfg: VocabConfig) -> TokenCounter:
    """count_words in this process, on sentences joined by spaces (`joined`: texts of at most
    ~COUNT_CHUNK characters, counted one at a time with numpy by `wordcount.TokenCounter`).
    Words made of ASCII alone are counted as BERT's words directly; the other tokens (ASCII
    punctuation split off) are counted as they are, then only the distinct ones are normalized,
    in bulk (`basic_words`, a corpus has about ten times fewer distinct tokens than tokens),
    and their words counted as often as the token occurred."""
    words, raw = TokenCounter(), TokenCounter()
    for text in texts:
        if cfg.do_lower_case and "Σ" in text:  # lowercases by its context: tokens stay whole
            raw.add_space_separated(text.encode("utf-8"))
        else:
            words.add_words(text.encode("utf-8"), cfg.do_lower_case, raw)
    tokens, counts = raw.result()
    lines = basic_words(tokens, cfg.do_lower_case, cfg.strip_accents)
    for a, b in chunk_bounds(lines, len(lines)):
        words.add_lines("\n".join(lines[a:b]).encode("utf-8"), counts[a:b])
    return words


def trainer_feed(words: Counter[str], seed: int) -> tuple[list[list[str]], float]:
    """The word occurrences the trainer is fed, and the factor their counts were divided by.

    Hugging Face's trainer takes text, not counts, and costs ~7 us per distinct word and a
    little per occurrence. So it gets the TRAIN_WORDS most frequent words (ties at the cut by
    word), each repeated count/scale times, where scale brings the total near
    TRAIN_OCCURRENCES; the fractional part is rounded up or down at random (unbiased; seeded).
    Words over MAX_INPUT_CHARS_PER_WORD characters are left out: the tokenizer makes them one
    [UNK] whatever the vocabulary, and the trainer's merges take quadratic time in a word's
    length (a 1 MB word would take hours)."""
    vocab = [w for w in words if len(w) <= MAX_INPUT_CHARS_PER_WORD]
    counts = np.fromiter((words[w] for w in vocab), dtype=np.int64, count=len(vocab))
    if len(vocab) > TRAIN_WORDS:
        cut = np.partition(counts, len(vocab) - TRAIN_WORDS)[len(vocab) - TRAIN_WORDS]
        above = np.flatnonzero(counts > cut)
        tied = sorted(np.flatnonzero(counts == cut).tolist(), key=vocab.__getitem__)
        kept = np.concatenate([above, tied[: TRAIN_WORDS - len(above)]]).astype(np.int64)
    else:
        kept = np.arange(len(vocab))
    total = int(counts[kept].sum())
    shares = counts[kept] / max(1.0, total / TRAIN_OCCURRENCES)
    fed = [vocab[i] + " " for i in kept.tolist()]
    # A uniform draw per word from a hash of the word and the seed: the same whatever order
    # the words were counted in (one process or two).
    start = seed & 0xFFFFFFFF
    draws = np.fromiter((zlib.crc32(w.encode(), start) for w in fed), np.float64, len(fed))
    repeats = (np.floor(shares) + (draws / 2**32 < shares % 1)).astype(np.int64)
    lines = [w * r for w, r in zip(fed, repeats.tolist(), strict=True) if r]
    batches = [lines[i : i + BATCH_LINES] for i in range(0, len(lines), BATCH_LINES)]
    return batches, total / max(1, int(repeats.sum()))


def train_wordpiece(
    words: Counter[str], alphabet: list[str], budget: int, cfg: VocabConfig
) -> list[str]:
    """Hugging Face WordPiece training on word counts, every symbol id fixed up front
    (deterministic); --min-frequency is divided by the feed's scale like the counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    batches, scale = trainer_feed(words, cfg.seed)
    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    continuations = ["##" + c for c in alphabet]
    trainer = trainers.WordPieceTrainer(
        vocab_size=budget + len(SPECIALS),
        min_frequency=max(1, math.ceil(cfg.min_frequency / scale)),
        special_tokens=[*SPECIALS, *continuations],
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(iter(batches), trainer)
    vocab = tok.get_vocab()
    trained = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    known = set(SPECIALS) | set(alphabet) | set(continuations)
    merged = [t for t in trained if t not in known]
    return alphabet + continuations + merged


def train_sentencepiece(
    batches: Iterator[list[str]],
    alphabet: list[str],
    budget: int,
    cfg: VocabConfig,
    workdir: Path,
) -> list[str]:
    """SentencePiece on BERT-pre-tokenized text, converted to WordPiece pieces."""
    import sentencepiece as spm

    def sentences() -> Iterator[str]:
        for batch in batches:
            for line in basic_words(batch, cfg.do_lower_case, cfg.strip_accents):
                line = " ".join(line.split())
                while len(line.encode("utf-8")) > SP_MAX_SENTENCE_BYTES // 2:
                    cut = line.rfind(" ", 0, SP_MAX_SENTENCE_BYTES // 8)
                    cut = cut if cut > 0 else SP_MAX_SENTENCE_BYTES // 8
                    yield line[:cut]
                    line = line[cut:].lstrip()
                if line:
                    yield line

    spm.set_random_generator_seed(cfg.seed)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".sentencepiece-") as tmp:
        prefix = os.path.join(tmp, "sp")
        # Headroom: `▁x` and `x` pieces collapse in conversion; extras are cut after it.
        sp_vocab = budget + budget // 50 + 16
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=prefix,
            model_type=cfg.sentencepiece_model,
            vocab_size=sp_vocab,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=True,
            split_by_whitespace=True,
            max_sentence_length=SP_MAX_SENTENCE_BYTES,
            input_sentence_size=0,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=usable_cpus(),
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        raw = [
            sp.id_to_piece(i)
            for i in range(sp.get_piece_size())
            if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i))
        ]
    return convert_sentencepiece_pieces(raw, alphabet)[:budget]


def convert_sentencepiece_pieces(raw: Sequence[str], alphabet: list[str]) -> list[str]:
    """`▁x` -> `x`, `x` -> `##x`; every alphabet char as x and ##x first; no junk, no dupes."""
    allowed = set(alphabet)
    out = alphabet + ["##" + c for c in alphabet]
    seen = set(out)
    for piece in raw:
        word = piece[1:] if piece.startswith("▁") else piece
        if not word or "▁" in word or not set(word) <= allowed:
            continue
        token = word if piece.startswith("▁") else "##" + word
        if token not in seen:
            seen.add(token)
            out.append(token)
    return out


def measure_quality(tokens: list[str], cfg: VocabConfig, heldout: list[str]) -> Quality:
    """[UNK] rate, pieces per word and vocabulary use on the held-out sentences.

    WordPiece splits each word on its own, so the held-out words are counted (`count_texts`,
    tested equal to Google's BasicTokenizer) and each distinct word is tokenized once."""
    q = Quality("held-out documents", vocab_size=len(tokens))
    if not heldout:
        q.measured_on = "none (no document could be held out)"
        return q
    words = count_texts(joined(heldout), cfg).to_counter()
    vocab = {t: i for i, t in enumerate(tokens)}
    encodings = wordpiece_tokenizer(vocab).encode_batch(list(words), add_special_tokens=False)
    counts = np.fromiter(words.values(), dtype=np.int64, count=len(words))
    pieces = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(words))
    unk = np.fromiter((e.ids == [vocab[UNK]] for e in encodings), dtype=bool, count=len(words))
    q.sentences = len(heldout)
    q.words = int(counts.sum())  # a word over 200 characters is one [UNK]
    q.tokens = int(pieces @ counts)
    q.unk_tokens = int(counts[unk].sum())
    q.distinct_ids = len(set().union(*(e.ids for e in encodings)))
    return q


UNCOMPARED = ("input", "output", "overwrite", "progress")  # the inputs are compared as files


def check_replacing(
    out: Path, config: dict[str, Any], cls: type, inputs: Sequence[InputFile]
) -> None:
    """Refuse to replace, without --overwrite, a finished vocabulary in --output that was made
    with other settings or from other input files: a vocabulary of a large corpus takes long
    to make, and a rerun with another flag more often meant another directory. The same
    settings on the same files make the same vocabulary again (training is byte-identical
    from run to run), so that rerun goes ahead."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("stage") != "vocab":
        return
    old = {k: v for k, v in manifest.get("config", {}).items() if k not in UNCOMPARED}
    new = {k: v for k, v in config.items() if k not in UNCOMPARED}
    changes = []
    if made_by(old) != made_by(new):
        changes.append(f"it was made by {made_by(old)}, this by {made_by(new)}")
    elif changed := changed_settings(old, new, cls):
        changes.append(describe_changes(old, new, changed[:3], cls))
        if len(changed) > 3:
            changes.append(f"{len(changed) - 3} more")
    now = [f.describe() for f in inputs]
    if any(i["bytes"] is None for i in now):
        changes.append("standard input or a pipe cannot be checked against the files it was "
                       "made from")  # fmt: skip
    elif how := corpus_change(manifest.get("inputs") or [], now):
        changes.append(f"the input files differ ({how})")
    if edited_outputs(out, ["vocab.txt"], manifest):
        changes.append(
            "its vocab.txt was edited after it was written, new words in its [unused] slots "
            "perhaps, which making it again would undo"
        )
    if changes:
        raise UserError(
            f"--output: {out} holds a vocabulary made another way "
            f"({'; '.join(changes)}); use another directory, or pass --overwrite to replace it."
        )


# ----------------------------------------------------------------------------- vocab extend


@dataclass
class ExtendResult:
    """What `extend_vocab` wrote, for the CLI summary and for tests."""

    output: Path
    base: Vocab
    tokens: list[str]
    added: list[dict[str, Any]]  # id, slot, word, count (in the sample), pieces before
    slots: int  # [unusedN] lines in the base vocabulary
    stats: CorpusStats
    before: Quality
    after: Quality
    sampled_sentences: int
    already: list[str]  # --words entries the vocabulary holds already
    rarer: int = 0  # with room left: words it splits, seen fewer than --min-count times


def extend_vocab(cfg: VocabExtendConfig) -> ExtendResult:
    """`bertforge vocab extend`: new words over the [unusedN] lines of --vocab, every other
    line kept, written with the tokenizer files and a manifest to --output."""
    base = load_vocab(cfg.vocab, cfg.do_lower_case)
    if Path(cfg.output).resolve() == base.path.parent.resolve():
        raise UserError(
            f"--output {cfg.output} is the directory of --vocab {base.path}; write the extended "
            "vocabulary to another directory (the checkpoint's own must stay as it is)."
        )
    if base.casing_doubt:
        print(base.casing_doubt, file=sys.stderr)
    return _extend_vocab(cfg, base)


def made_by(config: dict[str, Any]) -> str:
    return f"`bertforge vocab{' extend' if config.get('algorithm') == 'extend' else ''}`"


def extend_record(cfg: VocabExtendConfig, base: Vocab) -> dict[str, Any]:
    """The settings an extended vocabulary's manifest records: the base's casing, as used."""
    return {
        **config_to_dict(cfg),
        "do_lower_case": base.do_lower_case,
        "strip_accents": base.strip_accents,
        "algorithm": "extend",
    }


@locked_output("vocab")
def _extend_vocab(cfg: VocabExtendConfig, base: Vocab) -> ExtendResult:
    slots = [i for i, t in enumerate(base.tokens) if UNUSED.fullmatch(t)]
    if not slots:
        raise UserError(
            f"--vocab: {base.path} has no [unusedN] lines to write new words over; a vocabulary "
            "without them cannot grow without changing the checkpoint's ids (train a new one "
            "with `bertforge vocab`)."
        )
    room = len(slots) if cfg.max_words is None else min(len(slots), cfg.max_words)
    listed, already = read_word_list(Path(cfg.words), base) if cfg.words else ([], [])
    if len(listed) > room:
        raise UserError(
            f"--words {cfg.words} lists {len(listed)} new words, but there is room for {room} "
            f"({len(slots)} [unusedN] lines in {base.path}"
            + (f", --max-words {cfg.max_words}" if cfg.max_words is not None else "")
            + "); shorten the list."
        )
    scan_cfg = VocabConfig(
        input=cfg.input,
        strict_utf8=cfg.strict_utf8,
        text_field=cfg.text_field,
        output=cfg.output,
        vocab_size=base.size,
        do_lower_case=base.do_lower_case,
        strip_accents=base.strip_accents,
        max_sentences=cfg.max_sentences,
        heldout_sentences=cfg.heldout_sentences,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    check_output_apart(cfg.output, cfg.input)
    out = prepare_output_dir(cfg.output, "vocab", cfg.overwrite, "--output")
    inputs = resolve_inputs(cfg.input)
    record = extend_record(cfg, base)
    if not cfg.overwrite:
        check_replacing(out, record, VocabExtendConfig, inputs)
    begin_output(out, "vocab")
    scan = scan_corpus(inputs, scan_cfg)
    require_text(scan.stats, cfg.input)
    counts = count_words(scan.sample, scan_cfg)
    vocab = {t: i for i, t in enumerate(base.tokens)}
    frequent, rarer = frequent_split_words(
        counts, vocab, room - len(listed), cfg.min_count, set(listed)
    )
    chosen = listed + frequent
    tokens = list(base.tokens)
    added = []
    for slot, word in zip(slots, chosen, strict=False):
        pieces = wordpiece_ids(word, vocab)
        added.append(
            {
                "id": slot,
                "slot": tokens[slot],
                "word": word,
                "count": counts.get(word, 0),
                "pieces": len(pieces) if pieces else None,
            }
        )
        tokens[slot] = word
    outputs = save_tokenizer_files(out, tokens, base.do_lower_case, base.strip_accents)
    before = measure_quality(list(base.tokens), scan_cfg, scan.heldout)
    after = measure_quality(tokens, scan_cfg, scan.heldout)
    write_manifest(
        out,
        "vocab",
        record,
        inputs=[f.describe() for f in inputs],
        counts={
            **scan.stats.as_dict(),
            "vocab_size": len(tokens),
            "sampled_sentences": len(scan.sample),
            "heldout_documents": len(scan.heldout_docs),
            "unused_slots": len(slots),
            "added_words": len(added),
            "rarer_split_words": rarer,
        },
        outputs=outputs,
        extra={
            "extends": {"vocab": str(base.path.resolve()), "sha256": base.sha256},
            "added": added,
            "quality_before": before.as_dict(),
            "quality": after.as_dict(),
        },
    )
    finish_output(out)
    return ExtendResult(out, base, tokens, added, len(slots), scan.stats, before, after,
                        len(scan.sample), already, rarer if len(added) < room else 0)  # fmt: skip


def read_word_list(path: Path, base: Vocab) -> tuple[list[str], list[str]]:
    """--words: (new words in file order, listed words the vocabulary holds already), each
    normalized as the vocabulary's tokenizer normalizes text. A line `##x` is a continuation
    piece. A line that BERT reads as several words (spaces, punctuation) is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--words: {path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--words: {path} is not UTF-8 text (byte {e.start}).") from None
    new: list[str] = []
    already: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or (entry.startswith("#") and not entry.startswith("##")):
            continue
        prefix = "##" if entry.startswith("##") else ""
        words = basic_words([entry[len(prefix) :]], base.do_lower_case, base.strip_accents)[0]
        if len(words.split()) != 1:
            seen = " | ".join(words.split()) or "nothing"
            raise UserError(
                f"--words {path}:{n}: {entry!r} is not one word to BERT's tokenizer (it reads "
                f"{seen}); write one word per line, without spaces or punctuation."
            )
        word = prefix + words.strip()
        if len(word) > MAX_INPUT_CHARS_PER_WORD:
            raise UserError(
                f"--words {path}:{n}: longer than {MAX_INPUT_CHARS_PER_WORD} characters; BERT "
                "reads such a word as [UNK] whatever the vocabulary."
            )
        if word in base.tokens:
            already.append(word)
        elif word not in new:
            new.append(word)
    return new, already


def frequent_split_words(
    counts: Counter[str], vocab: dict[str, int], n: int, min_count: int, exclude: set[str]
) -> tuple[list[str], int]:
    """The `n` words of `counts` whose addition saves the most pieces: occurrences x (pieces
    - 1) under `vocab`, ties by word; and how many more words `vocab` splits are left out for
    being seen fewer than `min_count` times (the summary says so when room is left). Words in
    `vocab` or `exclude`, and words with a character `vocab` lacks ([UNK]), are left out."""
    if n <= 0:
        return [], 0
    words = [
        w for w in counts
        if w not in vocab and w not in exclude and len(w) <= MAX_INPUT_CHARS_PER_WORD
    ]  # fmt: skip
    encodings = wordpiece_tokenizer(vocab).encode_batch(words, add_special_tokens=False)
    unk = vocab[UNK]
    pieces = {  # the words `vocab` splits, and into how many pieces
        w: len(e.ids)
        for w, e in zip(words, encodings, strict=True)
        if len(e.ids) > 1 and unk not in e.ids
    }
    saved = [(-(counts[w] * (k - 1)), w) for w, k in pieces.items() if counts[w] >= min_count]
    return [w for _, w in heapq.nsmallest(n, saved)], len(pieces) - len(saved)
