"""`bertforge data`: corpus -> tokenized documents -> instances -> shards.

Two modes share instances.py (Google's algorithm) and the writers:

* Default: streaming and parallel. The main process reads the corpus and cuts it into work units
  of about --unit-mb of text at document boundaries; worker processes tokenize a unit, create
  its instances (Google's segmenting, with random next segments drawn from the same unit),
  shuffle them within the unit, mask them (static masks) and write one shard per unit. Each
  unit's randomness comes from (random_seed, unit index) alone, so the bytes do not depend on
  the number of workers or on an interruption. Memory is bounded by a few units per worker.
  A finished unit leaves its shard and then `.parts/unit-N.json` (written atomically, in that
  order); a rerun of the same command skips finished units, and the manifest is written last.
* --google-compatible: Google's create_training_instances in one process with its random call
  order and its global shuffle, every instance in memory; records identical to Google's.

Deviation of the default mode from Google's script (documented in the README): the shuffle of
documents and of instances, and the choice of random next documents, stay inside a unit (4 MB
of text by default, thousands of documents) instead of spanning the corpus; masking follows
Google's rule with numpy's random streams (masking.py). Instance statistics match Google's
(tests/reference/test_data_reference.py checks them).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import json
import random
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from bertforge import __version__
from bertforge.config import DataConfig, config_to_dict, describe_changes
from bertforge.corpus import (
    STDIN,
    CorpusStats,
    InputFile,
    Progress,
    check_output_apart,
    corpus_change,
    corpus_notes,
    corpus_warnings,
    inputs_diff,
    iter_documents,
    progress_bar,
    require_text,
    resolve_inputs,
    stamped,
    total_size,
    with_digests,
)
from bertforge.datacheck import summarize
from bertforge.errors import UserError
from bertforge.fileio import (
    MANIFEST,
    RUN_FILE,
    atomic_open,
    locked_output,
    prepare_output_dir,
    read_manifest,
    sha256_file,
    size_text,
    write_json,
    write_manifest,
)
from bertforge.instances import (
    Instance,
    InstanceParams,
    VocabIds,
    create_training_instances,
    pair_ranges,
)
from bertforge.masking import MaskSpec, mask_batch
from bertforge.sentences import split_sentences
from bertforge.shards import VERSION as SHARD_VERSION
from bertforge.shards import encode_header, id_dtype, record_dtype
from bertforge.tfrecord import bert_example, frame, framed_examples
from bertforge.tokenization import (
    LineEncoder,
    Vocab,
    basic_words,
    copy_vocab,
    load_vocab,
    segment_sums,
)
from bertforge.workers import finished, process_pool, usable_cpus

ENCODE_LINES = 1 << 16  # lines per LineEncoder call
CHUNK = 8192  # instances masked and encoded at a time
UNK_WARN_SHARE = 0.01  # of the corpus's tokens [UNK]: a warning (a fitting vocabulary: ~0%)
UNK_EXAMPLES = 5  # words that became [UNK], kept per unit and named in the warning
EARLY_WARNING_UNITS = 4  # inputs of this many units or more: the first shard's warnings at once
PARTS = ".parts"
GOOGLE_FILE = "data.tfrecord"
# Settings that do not change the output bytes; a resumed run may change them.
NOT_IN_RUN_ID = ("workers", "progress", "overwrite", "output", "input", "vocab")


@dataclass(frozen=True)
class DataResult:
    output: Path
    manifest: dict[str, Any]
    resumed_units: int  # units found finished from an earlier run
    unchanged: bool = False  # the whole output was: nothing redone


# ----------------------------------------------------------------------------- tokenization


def unit_tokens(
    docs: Sequence[Sequence[str]], encoder: LineEncoder, dtype: np.dtype
) -> tuple[np.ndarray, list[list[int]]]:
    """tokenize_documents as the default mode uses it: all token ids end to end, and per
    document where its sentences start in them (and where the last ends)."""
    lines = [s for d in docs for s in d]
    parts = [encoder.encode(lines[i : i + ENCODE_LINES], dtype)
             for i in range(0, len(lines), ENCODE_LINES)]  # fmt: skip
    flat = np.concatenate([ids for ids, _ in parts] or [np.zeros(0, dtype)])
    lengths = list(itertools.chain.from_iterable(n.tolist() for _, n in parts))
    bounds, pos, k = [], 0, 0
    for d in docs:
        starts = [pos]
        for n in lengths[k : k + len(d)]:
            if n:  # a sentence that tokenizes to nothing is dropped
                pos += n
                starts.append(pos)
        k += len(d)
        if len(starts) > 1:  # so is a document left empty
            bounds.append(starts)
    return flat, bounds


def unk_examples(lines: Sequence[str], encoder: LineEncoder, unk_id: int) -> list[list[Any]]:
    """The UNK_EXAMPLES words of `lines` that became [UNK] most often, as [word, count] (most
    first, then by word), for the [UNK] warning. Each distinct space-separated piece is
    encoded once more (the encoder's table holds most of them), and the words of the pieces
    with an [UNK] once each; run only for a unit with many [UNK]s."""
    pieces = collections.Counter(" ".join(lines).split(" "))
    distinct = list(pieces)
    ids, per_piece = encoder.encode(distinct, np.dtype(np.int64))
    has_unk = segment_sums((ids == unk_id).astype(np.int64), per_piece)
    bad = [p for p, n in zip(distinct, has_unk.tolist(), strict=True) if n]
    words: collections.Counter[str] = collections.Counter()
    split = basic_words(bad, encoder.do_lower_case, encoder.strip_accents)
    for piece, piece_words in zip(bad, split, strict=True):
        for w in piece_words.split():
            words[w] += pieces[piece]
    names = list(words)
    ids, per_word = encoder.encode(names, np.dtype(np.int64))
    unk = segment_sums((ids == unk_id).astype(np.int64), per_word)
    found = [(-words[w], w) for w, n in zip(names, unk.tolist(), strict=True) if n]
    return [[w, -c] for c, w in sorted(found)[:UNK_EXAMPLES]]


def tokenize_documents(
    docs: Sequence[Sequence[str]], encoder: LineEncoder
) -> list[list[list[int]]]:
    """Documents of token ids; sentences that tokenize to nothing and documents left empty are
    dropped, as in Google's script (unit_tokens, as nested lists)."""
    flat, bounds = unit_tokens(docs, encoder, np.dtype(np.int64))
    ids = flat.tolist()
    return [[ids[b[i] : b[i + 1]] for i in range(len(b) - 1)] for b in bounds]


# ----------------------------------------------------------------------------- default mode


@dataclass(frozen=True)
class UnitSettings:
    """Everything a worker needs besides the unit's text (picklable)."""

    params: InstanceParams
    dupe_factor: int
    random_seed: int
    format: str  # native | tfrecord
    static: bool
    output: str
    settings_id: str  # the run's settings without its input files (`settings_id`)
    tokens: tuple[str, ...]
    do_lower_case: bool
    strip_accents: bool | None
    split_sentences: bool = False


@dataclass
class UnitArrays:
    """A unit's instances before masking, padded: [CLS] A [SEP] B [SEP] 0 0 ..."""

    ids: np.ndarray  # [n, max_seq_length]
    lengths: np.ndarray  # [n]
    sep_a: np.ndarray  # [n] index of the first [SEP]
    next_sentence: np.ndarray  # [n] 1 when B is a random segment


def unit_rngs(random_seed: int, unit: int) -> tuple[random.Random, np.random.Generator]:
    """The unit's two random streams, from (seed, unit) alone: Python's for the per-instance
    choices of Google's segmenting (cheap scalar draws), numpy's for shuffles and masks."""
    return random.Random(f"bertforge:{random_seed}:{unit}"), np.random.default_rng(
        [random_seed, unit]
    )


def unit_instances(
    flat: np.ndarray,
    bounds: list[list[int]],
    params: InstanceParams,
    vocab: VocabIds,
    dupe_factor: int,
    rng: random.Random,
    np_rng: np.random.Generator,
) -> UnitArrays:
    """Google's segmenting over one unit (see unit_tokens), dupe_factor passes, instances
    shuffled in the unit.

    The segmenting decides token ranges (`pair_ranges`); the instances' ids are then copied
    from `flat` by numpy, CHUNK rows at a time."""
    seq = params.max_seq_length
    r = pair_ranges(bounds, seq, params.short_seq_prob, dupe_factor, rng)
    order = np_rng.permutation(len(r.a_len))  # the unit's shuffle, applied before assembly
    a_start, a_len, b_start, b_len, next_sentence = (
        np.array(v, dtype=np.int64)[order]
        for v in (r.a_start, r.a_len, r.b_start, r.b_len, r.is_random_next)
    )
    n = len(a_len)
    ids = np.zeros((n, seq), dtype=flat.dtype)
    for lo in range(0, n, CHUNK):
        sl = slice(lo, lo + CHUNK)
        rows = ids[sl]
        copy_ranges(flat, a_start[sl], a_len[sl], rows, 1)
        copy_ranges(flat, b_start[sl], b_len[sl], rows, a_len[sl] + 2)
        index = np.arange(len(rows))
        rows[:, 0] = vocab.cls_id
        rows[index, a_len[sl] + 1] = vocab.sep_id
        rows[index, a_len[sl] + b_len[sl] + 2] = vocab.sep_id
    return UnitArrays(ids, a_len + b_len + 3, a_len + 1, next_sentence)


def copy_ranges(
    src: np.ndarray, starts: np.ndarray, lens: np.ndarray, rows: np.ndarray, column: Any
) -> None:
    """Row i of `rows` ([n, seq], C-contiguous) gets src[starts[i] : starts[i] + lens[i]] from
    `column` (one for all rows, or one per row) on: every range in one gather and scatter."""
    stream = np.cumsum(lens) - lens  # where each range begins in the ranges end to end
    k = np.arange(int(lens.sum()))
    dest = np.repeat(np.arange(len(lens)) * rows.shape[1] + column - stream, lens) + k
    rows.reshape(-1)[dest] = src[np.repeat(starts - stream, lens) + k]


def mask_spec(params: InstanceParams, vocab: VocabIds) -> MaskSpec:
    return MaskSpec(params.masked_lm_prob, params.max_predictions_per_seq,
                    params.do_whole_word_mask, vocab.size, vocab.mask_id,
                    np.asarray(vocab.is_continuation, dtype=bool))  # fmt: skip


def shard_name(unit: int, fmt: str) -> str:
    return f"shard-{unit:05d}." + ("bin" if fmt == "native" else "tfrecord")


def shard_bytes(
    arrays: UnitArrays, s: UnitSettings, unit: int, spec: MaskSpec,
    np_rng: np.random.Generator, counts: dict[str, int],
) -> Iterator[bytes]:  # fmt: skip
    """The shard's bytes, in pieces; masks are drawn CHUNK rows at a time to bound memory.
    Adds the number of masked tokens to counts."""
    p = s.params
    n = len(arrays.lengths)
    counts["masked_tokens"] = 0
    rec = None
    if s.format == "native":
        rec = np.zeros(n, dtype=record_dtype(spec.vocab_size, p.max_seq_length,
                                             p.max_predictions_per_seq, s.static))  # fmt: skip
        rec["input_ids"], rec["length"], rec["sep_a"] = arrays.ids, arrays.lengths, arrays.sep_a
        rec["next_sentence_label"] = arrays.next_sentence
    for lo in range(0, n if s.static else 0, CHUNK):
        sl = slice(lo, lo + CHUNK)
        m = mask_batch(arrays.ids[sl], arrays.lengths[sl], arrays.sep_a[sl], spec, np_rng)
        counts["masked_tokens"] += int(m.counts.sum())
        if rec is not None:
            rec["input_ids"][sl], rec["num_masked"][sl] = m.input_ids, m.counts
            rec["masked_lm_positions"][sl], rec["masked_lm_ids"][sl] = m.positions, m.labels
        else:
            yield framed_examples(m.input_ids, arrays.lengths[sl], arrays.sep_a[sl],
                                  m.positions, m.labels, m.counts,
                                  arrays.next_sentence[sl])  # fmt: skip
    if rec is not None:
        meta = {"unit": unit, "settings_id": s.settings_id, "max_seq_length": p.max_seq_length,
                "max_predictions_per_seq": p.max_predictions_per_seq,
                "vocab_size": spec.vocab_size, "static_masking": s.static}  # fmt: skip
        yield encode_header(rec, meta)
        yield rec.tobytes()


def build_unit(
    unit: int, docs: Sequence[Sequence[str]], encoder: LineEncoder, s: UnitSettings,
    spec: MaskSpec, vocab: VocabIds,
) -> dict[str, Any]:  # fmt: skip
    """Tokenize, segment, mask and write one unit; returns (and records) its part summary. A
    unit's output depends on the settings, its index and its documents alone, so a part with
    the same `settings_id` and `text_sha256` is this unit's output, whatever the run."""
    text_sha256, text_bytes = unit_text_digest(docs)
    if s.split_sentences:
        docs = sentence_documents(docs)
    flat, bounds = unit_tokens(docs, encoder, id_dtype(spec.vocab_size))
    rng, np_rng = unit_rngs(s.random_seed, unit)
    arrays = unit_instances(flat, bounds, s.params, vocab, s.dupe_factor, rng, np_rng)
    counts: dict[str, int] = {}
    pieces = shard_bytes(arrays, s, unit, spec, np_rng, counts)
    out = Path(s.output)
    name = shard_name(unit, s.format)
    digest, size = hashlib.sha256(), 0
    with atomic_open(out / name, "wb") as f:
        for piece in pieces:
            f.write(piece)
            digest.update(piece)
            size += len(piece)
    lengths, unks = arrays.lengths, int(np.count_nonzero(flat == vocab.unk_id))
    part = {
        "unit": unit, "settings_id": s.settings_id, "text_sha256": text_sha256, "file": name,
        "text_bytes": text_bytes,
        "records": len(lengths),
        "sha256": digest.hexdigest(), "bytes": size, "documents": len(bounds),
        "sentences": sum(len(b) - 1 for b in bounds), "tokens": int(lengths.sum()),
        "corpus_tokens": len(flat),
        "unk_tokens": unks,
        "random_next": int(arrays.next_sentence.sum()),
        "length_histogram": np.bincount(lengths, minlength=s.params.max_seq_length + 1).tolist(),
        **counts,
    }  # fmt: skip
    if unks >= UNK_WARN_SHARE * len(flat) > 0:
        part["unk_examples"] = unk_examples([t for d in docs for t in d], encoder, vocab.unk_id)
    write_json(out / PARTS / f"unit-{unit:05d}.json", part)
    return part


_WORKER: dict[str, Any] = {}


def _init_worker(s: UnitSettings) -> None:
    _WORKER["settings"] = s
    _WORKER["encoder"] = LineEncoder(s.tokens, s.do_lower_case, s.strip_accents)
    _WORKER["vocab"] = vocab = VocabIds.from_tokens(s.tokens)
    _WORKER["spec"] = mask_spec(s.params, vocab)


def _run_unit(unit: int, docs: list[list[str]]) -> dict[str, Any]:
    w = _WORKER
    return build_unit(unit, docs, w["encoder"], w["settings"], w["spec"], w["vocab"])


def unit_text_digest(docs: Sequence[Sequence[str]]) -> tuple[str, int]:
    """A unit's documents as read (before --split-sentences), hashed: what tells a unit
    finished by an earlier run from one whose text has changed since; and their UTF-8 bytes."""
    digest, size = hashlib.sha256(), 0
    for doc in docs:
        text = ("\n".join(doc) + "\n\n").encode()
        digest.update(text)
        size += len(text)
    return digest.hexdigest(), size


def iter_units(
    inputs: Sequence[InputFile], stats: CorpusStats, cfg: DataConfig, progress: Progress | None,
) -> Iterator[tuple[int, list[list[str]]]]:  # fmt: skip
    """(unit index, documents) with about --unit-mb of characters each, cut between
    documents."""
    unit: list[list[str]] = []
    size = index = 0
    unit_chars = int(cfg.unit_mb * 1e6)
    docs = iter_documents(inputs, stats, strict_utf8=cfg.strict_utf8, text_field=cfg.text_field,
                          progress=progress)  # fmt: skip
    for doc in docs:
        unit.append(doc)
        size += sum(len(s) + 1 for s in doc)
        if size >= unit_chars:
            yield index, unit
            unit, size, index = [], 0, index + 1
    if unit:
        yield index, unit


def run_units(cfg: DataConfig, inputs: list[InputFile], s: UnitSettings, out: Path,
              stats: CorpusStats, vocab_file: str) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Process every unit not finished before; returns all parts in unit order and how many
    were found finished. A unit finished before is kept when its text is the same as now
    (`text_sha256`), so an input fixed after an error (a bad line near the end of a large
    file) costs only the units it changed."""
    earlier: dict[int, dict[str, Any]] = {}
    for p in sorted((out / PARTS).glob("unit-*.json")):
        with contextlib.suppress(json.JSONDecodeError, OSError, KeyError):
            part = json.loads(p.read_text(encoding="utf-8"))
            if part.get("settings_id") == s.settings_id and (out / part["file"]).is_file():
                earlier[part["unit"]] = part
    parts: dict[int, dict[str, Any]] = {}
    resumed = 0
    workers = cfg.workers or usable_cpus()
    bar = progress_bar(inputs, cfg.progress, "data")
    progress = Progress(callbacks=[bar.update] if bar else [])

    size = total_size(inputs)
    checked = size is not None and size < EARLY_WARNING_UNITS * cfg.unit_mb * 1e6

    def collect(part: dict[str, Any]) -> None:
        nonlocal checked
        parts[part["unit"]] = part
        if not checked:  # a long run: what the first shard shows, while it can be stopped
            checked = True
            text = expanded_size(size, stats.bytes, progress.done)
            for warning in first_shard_warnings(part, s, vocab_file, text, parts.values()):
                (bar.write if bar else print)(warning, file=sys.stderr)  # above the bar
        if bar:
            bar.set_postfix(documents=f"{stats.documents:,}",
                            instances=f"{sum(p['records'] for p in parts.values()):,}")  # fmt: skip

    def finished_before(unit: int, docs: list[list[str]]) -> bool:
        nonlocal resumed
        part = earlier.pop(unit, None)
        if part is None or part.get("text_sha256") != unit_text_digest(docs)[0]:
            return False
        parts[unit] = part
        resumed += 1
        return True

    units = iter_units(inputs, stats, cfg, progress)
    total_units = 0
    try:
        if workers == 1:
            _init_worker(s)
            for unit, docs in units:
                total_units = unit + 1
                if not finished_before(unit, docs):
                    collect(_run_unit(unit, docs))
        else:
            with process_pool(workers, _init_worker, (s,)) as pool:
                pending: set[cf.Future] = set()
                for unit, docs in units:
                    total_units = unit + 1
                    if finished_before(unit, docs):
                        continue
                    pending.add(pool.submit(_run_unit, unit, docs))
                    if len(pending) >= 2 * workers:  # bounded read-ahead: flat memory
                        done, pending = finished(pending)
                        for fut in done:
                            collect(fut.result())
                while pending:
                    done, pending = finished(pending)
                    for fut in done:
                        collect(fut.result())
    finally:
        if bar:
            bar.close()
    return [parts[u] for u in range(total_units)], resumed


# ----------------------------------------------------------------------------- google mode


def google_documents(inputs: Sequence[InputFile], encoder: LineEncoder, stats: CorpusStats,
                     strict_utf8: bool, split: bool = False) -> list[list[list[int]]]:  # fmt: skip
    """All documents as Google's script reads them: a file's end does not end a document, and
    WikiExtractor's <doc> lines are text (their lines split into sentences first with
    `split`)."""
    docs = list(iter_documents(inputs, stats, strict_utf8=strict_utf8,
                               file_is_document_boundary=False, doc_elements=False,
                               text_field=None))  # fmt: skip
    return tokenize_documents(sentence_documents(docs) if split else docs, encoder)


def sentence_documents(docs: Sequence[Sequence[str]]) -> list[list[str]]:
    """The documents with each line split into its sentences (--split-sentences)."""
    return [[t for line in d for t in split_sentences(line)] for d in docs]


def write_tfrecords(
    instances: Iterable[Instance], paths: Sequence[Path], params: InstanceParams
) -> list[int]:
    """Write instances round-robin over the files (as Google does); returns records per file."""
    counts = [0] * len(paths)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(atomic_open(p, "wb")) for p in paths]
        for i, inst in enumerate(instances):
            record = bert_example(
                inst.input_ids, inst.segment_ids, inst.masked_lm_positions, inst.masked_lm_ids,
                inst.is_random_next, params.max_seq_length, params.max_predictions_per_seq,
            )  # fmt: skip
            files[i % len(files)].write(frame(record))
            counts[i % len(files)] += 1
    return counts


def run_google(cfg: DataConfig, inputs: list[InputFile], vocab: Vocab, params: InstanceParams,
               out: Path, stats: CorpusStats, run_id: str) -> list[dict[str, Any]]:  # fmt: skip
    """Google's create_training_instances, record for record: all in memory, one rng."""
    documents = google_documents(inputs, vocab.encoder(), stats, cfg.strict_utf8,
                                 cfg.split_sentences)  # fmt: skip
    rng = random.Random(cfg.random_seed)
    ids = VocabIds.from_tokens(vocab.tokens)
    instances = create_training_instances(documents, params, ids, cfg.resolved_dupe_factor, rng)
    write_tfrecords(instances, [out / GOOGLE_FILE], params)
    lengths = np.array([len(i.input_ids) for i in instances], dtype=np.int64)
    path = out / GOOGLE_FILE
    return [{
        "unit": 0, "run_id": run_id, "file": GOOGLE_FILE, "records": len(instances),
        "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "documents": stats.documents, "sentences": sum(map(len, documents)),
        "tokens": int(lengths.sum()),
        "random_next": sum(i.is_random_next for i in instances),
        "masked_tokens": sum(len(i.masked_lm_positions) for i in instances),
        "length_histogram": np.bincount(lengths, minlength=params.max_seq_length + 1).tolist(),
    }]  # fmt: skip


# ----------------------------------------------------------------------------- the stage


def run_settings(cfg: DataConfig, vocab: Vocab, inputs: Sequence[InputFile]) -> dict[str, Any]:
    """What determines the output bytes: resolved config, vocab and input files."""
    config = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_IN_RUN_ID}
    config.update(format=cfg.resolved_format, dupe_factor=cfg.resolved_dupe_factor,
                  max_predictions_per_seq=cfg.resolved_max_predictions,
                  do_lower_case=vocab.do_lower_case, static_masking=cfg.static)  # fmt: skip
    defaults = {f.name: f.default for f in fields(DataConfig)}
    for key in ("split_sentences", "text_field"):
        if config[key] == defaults[key]:  # absent at its default: data made before it is known
            del config[key]
    return {"stage": "data", "config": config, "vocab_sha256": vocab.sha256,
            "inputs": [i.describe() for i in inputs], "bertforge": __version__}  # fmt: skip


MANIFEST_ONLY = ("vocab", "vocab_size")  # a finished output's manifest adds them to its config


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """How `new` (`run_settings`) differs from `old`: an unfinished run's settings, or a
    finished output's manifest (which holds the vocabulary's sha256 under "vocab" and adds its
    path and size to the config; they were once reported as settings that changed)."""
    changes = []
    config = {k: v for k, v in old["config"].items() if k not in MANIFEST_ONLY}
    for key in sorted(set(config) | set(new["config"])):
        if config.get(key) != new["config"].get(key):
            changes.append(describe_changes(config, new["config"], [key]))
    if old.get("vocab_sha256", (old.get("vocab") or {}).get("sha256")) != new["vocab_sha256"]:
        changes.append("the vocabulary differs")
    if old.get("inputs") != new["inputs"]:
        changes.append(
            f"the input files differ ({inputs_diff(old.get('inputs') or [], new['inputs'])})"
        )
    return "; ".join(changes) or "settings differ"


def shard_files(out: Path) -> list[Path]:
    """The default mode's shards in a data directory, native or TFRecord."""
    return [*out.glob("shard-*.bin"), *out.glob("shard-*.tfrecord")]


def clear_output(out: Path) -> None:
    """Remove what an earlier data run left (for --overwrite)."""
    for p in [*shard_files(out), out / GOOGLE_FILE, out / MANIFEST, out / RUN_FILE]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)


def run_digest(settings: dict[str, Any]) -> str:
    """A short id of settings (`run_settings`, or part of them)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_id(run: dict[str, Any]) -> str:
    """The id of a run's settings (`run_settings`) without its input files: what a unit's
    output depends on besides its own text."""
    return run_digest({k: v for k, v in run.items() if k not in ("inputs", "run_id")})


def check_resumable(
    out: Path, run: dict[str, Any], run_id: str, overwrite: bool, inputs: Sequence[InputFile]
) -> str:
    """'done' when out already holds this exact output (from its input files as they are:
    an edit that kept their sizes is told by their times and sha256, `corpus_change`), 'go'
    otherwise (resuming an unfinished run with the same settings), 'changed' for an
    unfinished run with the same settings on input files that have changed since (its units
    are kept where their text is the same); refuses other settings unless overwrite, which
    starts over."""
    if overwrite:
        clear_output(out)
        return "go"
    manifest = read_manifest(out)
    previous = manifest
    if previous is None and (out / RUN_FILE).is_file():
        previous = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    if previous is None:
        return "go"
    what = "holds data" if manifest is not None else "holds an unfinished run"
    if streams := [i["path"] for i in run["inputs"] if i["bytes"] is None]:
        what_in = "standard input" if streams[0] == STDIN else f"a pipe ({streams[0]})"
        raise UserError(
            f"--output: {out} {what}; {what_in} cannot be checked against what it was "
            "made from, so it is neither kept nor resumed: pass --overwrite to make the data "
            "again, or use another directory."
        )
    if previous.get("run_id") == run_id:
        if manifest is None:
            return "go"
        if how := corpus_change(manifest.get("input_stamps") or [], stamped(inputs)):
            raise UserError(
                f"--output: {out} holds data made from other text ({how}); use another "
                "directory, or pass --overwrite to make the data again."
            )
        return "done"
    if manifest is None and settings_id(previous) == settings_id(run):
        return "changed"
    raise UserError(
        f"--output: {out} {what} made with other settings ({settings_diff(previous, run)}); "
        "use another directory, repeat the earlier settings to resume, or pass --overwrite."
    )


@locked_output("data")
def create_data(cfg: DataConfig) -> DataResult:
    """The data stage: resolve inputs and vocab, (resume and) write shards, then the manifest."""
    check_output_apart(cfg.output, cfg.input)
    inputs = resolve_inputs(cfg.input)
    vocab = load_vocab(cfg.vocab, cfg.do_lower_case)
    params = InstanceParams(cfg.max_seq_length, cfg.short_seq_prob, cfg.masked_lm_prob,
                            cfg.resolved_max_predictions, cfg.do_whole_word_mask)  # fmt: skip
    out = prepare_output_dir(cfg.output, "data", cfg.overwrite, "--output")
    run = run_settings(cfg, vocab, inputs)
    run_id = run_digest(run)
    state = check_resumable(out, run, run_id, cfg.overwrite, inputs)
    if vocab.casing_doubt:
        print(vocab.casing_doubt, file=sys.stderr)  # before the work: it may be hours
    if state == "done":
        manifest = read_manifest(out, "data")
        assert manifest is not None
        return DataResult(out, manifest, len(manifest["shards"]), unchanged=True)
    if state == "changed" and not cfg.google_compatible:
        print(f"data: the input files changed since the unfinished run in {out}; its shards "
              "are kept where their text is unchanged", file=sys.stderr)  # fmt: skip
    write_json(out / RUN_FILE, {**run, "run_id": run_id})
    for tmp in [*out.glob(".shard-*.tmp"), *out.glob(f"{PARTS}/.unit-*.tmp")]:
        tmp.unlink(missing_ok=True)  # half-written files of a killed run

    stats = CorpusStats()
    if cfg.google_compatible:
        parts, resumed = run_google(cfg, inputs, vocab, params, out, stats, run_id), 0
    else:
        settings = UnitSettings(params, cfg.resolved_dupe_factor, cfg.random_seed,
                                cfg.resolved_format, cfg.static, str(out), settings_id(run),
                                vocab.tokens,
                                vocab.do_lower_case, vocab.strip_accents,
                                cfg.split_sentences)  # fmt: skip
        parts, resumed = run_units(cfg, inputs, settings, out, stats, str(vocab.path))
    require_text(stats, cfg.input)
    records = sum(p["records"] for p in parts)
    if records == 0:
        raise UserError(
            f"--input: {', '.join(cfg.input)} gave no instance: no line tokenizes to anything "
            f"with {cfg.vocab}; check that the vocabulary fits the corpus."
        )
    copy_vocab(vocab, out)  # the records hold token ids only: their words travel with them
    manifest = write_data_manifest(cfg, vocab, inputs, out, run, run_id, parts, stats)
    listed = {p["file"] for p in parts}
    for stale in shard_files(out):
        if stale.name not in listed:  # units of an earlier input that was longer
            stale.unlink()
    shutil.rmtree(out / PARTS, ignore_errors=True)
    (out / RUN_FILE).unlink(missing_ok=True)
    return DataResult(out, manifest, resumed)


def write_data_manifest(cfg: DataConfig, vocab: Vocab, inputs: Sequence[InputFile], out: Path,
                        run: dict[str, Any], run_id: str, parts: list[dict[str, Any]],
                        stats: CorpusStats) -> dict[str, Any]:  # fmt: skip
    counts = {
        "corpus": stats.as_dict(),
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "sentences": sum(p["sentences"] for p in parts),
        "corpus_tokens": sum(p.get("corpus_tokens", 0) for p in parts),
        "text_ratio": text_ratio(parts, cfg.resolved_dupe_factor),
        "unk_share": unk_share(parts),
        "unk_words": unk_words(parts),
        **summarize(
            sum(p["records"] for p in parts), sum(p["tokens"] for p in parts),
            sum(p["random_next"] for p in parts),
            sum(p["masked_tokens"] for p in parts) if cfg.static else None,
            np.sum([p["length_histogram"] for p in parts], axis=0), cfg.max_seq_length,
        ),
    }  # fmt: skip
    shards = [{k: p[k] for k in ("file", "records", "sha256", "bytes")} for p in parts]
    config = dict(run["config"], vocab=str(vocab.path.parent), vocab_size=vocab.size)
    named = {"path": str(vocab.path.resolve()), "sha256": vocab.sha256, "size": vocab.size}
    return write_manifest(
        out, "data", config,
        inputs=[i.describe() for i in inputs], counts=counts,
        extra={"run_id": run_id, "vocab": named,
               "input_stamps": with_digests(stamped(inputs)),
               "shards": shards,
               "format": {"kind": cfg.resolved_format, "static_masking": cfg.static,
                          "shard_version": SHARD_VERSION}},
    )  # fmt: skip


def text_ratio(parts: list[dict[str, Any]], dupe_factor: int) -> float | None:
    """Tokens of text in the instances (without [CLS] and [SEP]) per token of the corpus read
    (times dupe_factor); None for parts from a bertforge that did not count them. Google's
    algorithm puts every sentence into some instance and cuts only what overflows
    max_seq_length, and random next sentences repeat text of other documents, so this is
    above 1 (1.1 to 1.5 on the demo corpus at lengths 64 to 512) unless the corpus's lines
    are far longer than a sentence: then most of the text is cut away."""
    if not parts or any("corpus_tokens" not in p for p in parts):
        return None
    text = sum(p["tokens"] - 3 * p["records"] for p in parts)
    return text / max(1, dupe_factor * sum(p["corpus_tokens"] for p in parts))


def unk_share(parts: list[dict[str, Any]]) -> float | None:
    """The share of the corpus's tokens that are [UNK] (None for Google's mode, or parts
    written before bertforge counted them)."""
    if not parts or any("unk_tokens" not in p or "corpus_tokens" not in p for p in parts):
        return None
    return sum(p["unk_tokens"] for p in parts) / max(1, sum(p["corpus_tokens"] for p in parts))


def unk_words(parts: list[dict[str, Any]]) -> list[str]:
    """The words that became [UNK] most often in the units with many [UNK]s (their kept
    examples, summed), UNK_EXAMPLES of them."""
    total: collections.Counter[str] = collections.Counter()
    for p in parts:
        total.update(dict(p.get("unk_examples", [])))
    return [w for _, w in sorted((-c, w) for w, c in total.items())[:UNK_EXAMPLES]]


def unk_warning(
    counts: dict[str, Any], do_lower_case: bool | None, vocab: str | None
) -> str | None:
    """A warning when at least UNK_WARN_SHARE of the corpus's tokens are [UNK]: a vocabulary
    made for other text, or one read with the wrong casing (an uncased vocabulary read as
    cased knows no capital letter, so every capitalized word becomes [UNK]). It names the
    words that became [UNK] most often, where the manifest has them."""
    share = counts.get("unk_share")
    if share is None or share < UNK_WARN_SHARE:
        return None
    casing = "uncased" if do_lower_case else "cased"
    words = ", ".join(f'"{w}"' for w in counts.get("unk_words", []))
    return (
        f"warning: {share:.1%} of the corpus's tokens are [UNK]"
        f"{f' (most often {words})' if words else ''}: the vocabulary "
        f"({vocab}, read as {casing}) lacks their pieces, and the model learns "
        "nothing of those words. Check that it is read with the casing it was made with "
        "(--do-lower-case / --no-do-lower-case for a bare vocab.txt), or train one on this "
        "corpus with `bertforge vocab`."
    )


def document_warning(counts: dict[str, Any]) -> str | None:
    """A warning when the corpus's documents are not what Google's format means by them: the
    whole corpus one document (no blank line anywhere), or documents of about one sentence
    (a blank line after every line), which make next-sentence prediction degenerate."""
    documents, sentences = counts.get("documents", 0), counts.get("sentences", 0)
    if documents == 1 and sentences > 100:
        return (
            f"warning: the corpus is one document of {sentences:,} sentences (no blank line in "
            "it). With one document the random next sentences come from the same text, and "
            "one draw of --short-seq-prob (Google's, per document) shortens every instance or "
            "none. Google's format puts a blank line between documents (articles, chapters, "
            "books)."
        )
    if counts.get("instances", 0) and counts.get("random_next_share", 0) >= 0.9:
        return (
            f"warning: {counts['random_next_share']:.0%} of the instances pair a random next "
            f"sentence (every instance of a one-sentence document does): the documents "
            f"average {sentences / max(1, documents):.1f} sentences. bertforge, like Google's "
            "scripts, expects one sentence per line and a blank line between documents, not "
            "between sentences; where each line is a paragraph, --split-sentences splits it."
        )
    return None


def line_warning(counts: dict[str, Any], max_seq_length: int) -> str | None:
    """A warning when most of the corpus's text was cut away (`text_ratio` below 0.5)."""
    ratio, tokens = counts.get("text_ratio"), counts.get("corpus_tokens")
    if ratio is None or ratio >= 0.5 or not tokens:
        return None
    per_line = tokens / max(1, counts.get("sentences", 1))
    return (
        f"warning: the instances hold only {ratio * 100:.2g}% as much text as the corpus: its "
        f"lines average {per_line:,.0f} tokens, and an instance keeps at most {max_seq_length} "
        "(the rest is cut away). bertforge, like Google's scripts, expects one sentence per "
        "line and a blank line between documents: split the text into sentences "
        "(--split-sentences does, by punctuation)."
    )


def mask_cap_warning(
    max_seq_length: int, max_predictions: int, masked_lm_prob: float
) -> str | None:
    """A warning when --max-predictions-per-seq caps the masking of full-length instances
    below --masked-lm-prob (Google's rule: min(cap, round(length x prob)) tokens masked), as
    Google's default 20 does from max_seq_length 137 on; Google's README says to set it to
    about max_seq_length x masked_lm_prob by hand, and nothing told when it was not."""
    wanted = max(1, round(max_seq_length * masked_lm_prob))
    if max_predictions >= wanted:
        return None
    return (
        f"warning: --max-predictions-per-seq {max_predictions} masks at most {max_predictions} "
        f"of an instance's {max_seq_length} tokens ({max_predictions / max_seq_length:.1%}), "
        f"where --masked-lm-prob {masked_lm_prob} asks for {wanted} in a full-length one, so "
        "the longer instances are masked less than asked. Give --max-predictions-per-seq "
        f"{wanted} (about max_seq_length x masked_lm_prob, as Google's README says); training "
        "reads it from the data."
    )


def manifest_warnings(m: dict[str, Any]) -> list[str]:
    """The warnings a finished data stage's manifest gives, from its counts: text cut away,
    [UNK]s, documents unlike Google's (print_summary prints them; run's report.md lists them)."""
    c, cfg = m.get("counts", {}), m.get("config", {})
    lines = line_warning(c, cfg.get("max_seq_length", 0))
    found = [
        *corpus_warnings(c.get("corpus", {})),
        lines,
        unk_warning(c, cfg.get("do_lower_case"), m.get("vocab", {}).get("path")),
        None if lines else document_warning(c),  # long lines make one-line documents too
    ]
    return [w for w in found if w]


def first_shard_warnings(
    part: dict[str, Any], s: UnitSettings, vocab_file: str, corpus_bytes: int | None,
    done: Iterable[dict[str, Any]],
) -> list[str]:  # fmt: skip
    """The warnings of manifest_warnings that one shard can tell (text cut away, [UNK]s), and
    whether the disk holds the shards to come, for a long run to be stopped early; the
    documents warning is about the whole corpus. `done`: the parts finished so far."""
    counts = {
        "corpus_tokens": part["corpus_tokens"], "sentences": part["sentences"],
        "text_ratio": text_ratio([part], s.dupe_factor), "unk_share": unk_share([part]),
        "unk_words": unk_words([part]),
    }  # fmt: skip
    found = [line_warning(counts, s.params.max_seq_length),
             unk_warning(counts, s.do_lower_case, vocab_file),
             space_warning(part, Path(s.output), corpus_bytes, done)]  # fmt: skip
    return [f"{w} (So far, from the first shard; Ctrl-C stops the run.)" for w in found if w]


def expanded_size(size: int | None, decoded: int, read: int) -> int | None:
    """The corpus's text, in bytes, from its `size` on disk and what reading it has given so
    far: `decoded` bytes of text from `read` bytes of files. A gzip, bz2, xz or zstd corpus
    holds several times its size in text, which the shards take room for."""
    if size is None or decoded <= 0 or read <= 0:
        return size
    return max(size, round(size * decoded / read))


def space_warning(part: dict[str, Any], out: Path, corpus_bytes: int | None,
                  done: Iterable[dict[str, Any]]) -> str | None:  # fmt: skip
    """When the shards still to come, at the first shard's bytes per byte of text, will not
    fit on the output's disk (None where the corpus's size is unknown: a pipe)."""
    text = part.get("text_bytes")
    if not corpus_bytes or not text:
        return None
    left = corpus_bytes - sum(p.get("text_bytes", 0) for p in done)
    need = part["bytes"] * left / text
    free = shutil.disk_usage(out).free
    if free >= need:
        return None
    return (
        f"warning: {out}: its disk has {size_text(free)} free, and the shards to come will take "
        f"about {size_text(need)} ({size_text(part['bytes'])} for the first "
        f"{size_text(text)} of the corpus's {size_text(corpus_bytes)} of text): the run will stop "
        "when the disk fills. Free some space or choose another --output (a rerun keeps the "
        "finished shards)."
    )


def split_summary(m: dict[str, Any]) -> str | None:
    """How many lines --split-sentences made how many sentences (None without it)."""
    if not m.get("config", {}).get("split_sentences"):
        return None
    c = m.get("counts", {})
    lines = c.get("corpus", {}).get("sentences", 0)
    return f"split: {lines:,} lines into {c.get('sentences', 0):,} sentences (--split-sentences)"


def print_summary(result: DataResult, file: Any = None) -> None:
    file = file or sys.stdout
    m = result.manifest
    c, fmt = m["counts"], m["format"]
    kind = f"{fmt['kind']}, {'static' if fmt['static_masking'] else 'dynamic'} masking"
    print(f"data: {c['instances']:,} instances in {len(m['shards'])} shard(s) ({kind}) -> "
          f"{result.output}", file=file)  # fmt: skip
    corpus = c["corpus"]
    print(
        f"  corpus: {corpus['bytes'] / 1e6:.1f} MB, {c['documents']:,} documents; mean length "
        f"{c['mean_length']:.1f} of {m['config']['max_seq_length']}, padding "
        f"{c['padding_share']:.1%}, random next {c['random_next_share']:.1%}",
        file=file,
    )
    if split := split_summary(m):
        print(f"  {split}", file=file)
    for note in corpus_notes(corpus):
        print(f"  {note}", file=file)
    if result.unchanged:
        print("  unchanged: made earlier from the same corpus and settings, so nothing was redone "
              "(--overwrite makes it again)", file=file)  # fmt: skip
    elif result.resumed_units:
        print(f"  resumed: {result.resumed_units} shard(s) were already finished", file=file)
    for warning in manifest_warnings(m):
        print(warning, file=sys.stderr)
