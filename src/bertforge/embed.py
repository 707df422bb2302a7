"""`bertforge embed`: vectors for the lines (sentence level) or words (token level) of a text.

Streaming: lines are read, embedded and appended to the output's temporary file in blocks
after a header of reserved size, so memory stays flat however long the input and the rows
are written once; at the end the header is filled in and the file renamed into place (an
interrupted run leaves no half-written output). Within a block, lines
are sorted by length before batching so little compute goes to padding. The model runs under
`--precision` (`hardware.resolve_precision`: bf16 where the processor has it), and the
vectors are written in float32.

The two output formats are written here rather than through numpy/safetensors' savers
because both of those need the whole array in memory; the formats themselves are tiny and
documented (npy: a header then raw rows; safetensors: a little-endian u64 header length, a
JSON header, raw tensors), and the tests read our files back with numpy and safetensors.

Words are BERT's basic-tokenizer words (whitespace and punctuation split), found from the
tokenizer's word ids; a word's vector pools its pieces (first, as flair does by default, or
mean). Token level cuts a line longer than the model reads into several forward passes at
word boundaries; sentence level keeps the first pieces and reports how many lines were cut.
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from bertforge.checkpoint import InitWeights
from bertforge.config import EmbedConfig
from bertforge.corpus import (
    CorpusStats,
    Progress,
    corpus_warnings,
    iter_texts,
    progress_bar,
    resolve_inputs,
)
from bertforge.errors import UserError
from bertforge.fileio import atomic_open
from bertforge.hardware import autocast_to, precision_name, resolve_precision
from bertforge.inference import Loaded, load_model
from bertforge.tokenization import CLS, SEP

BLOCK_LINES = 2048  # lines read, sorted by length and embedded together


@dataclass
class Chunk:
    """One forward pass worth of a line: piece ids and, at token level, its words' spans."""

    line: int
    ids: list[int]  # without [CLS]/[SEP]
    words: list[tuple[int, int]] = field(default_factory=list)  # piece [start, end) per word


@dataclass
class EmbedResult:
    output: Path
    lines: int
    rows: int
    dim: int
    truncated_lines: int


def embed_length(cfg: EmbedConfig, source: InitWeights) -> int:
    """Pieces per pass: by default as far as training reached; asked for, up to every position
    the model has. Asked beyond either, a note says so (once, before the run)."""
    positions, trained = source.config.max_position_embeddings, source.trained_length
    if cfg.max_length is None:
        return source.readable_length
    length = min(cfg.max_length, positions)
    if cfg.max_length > positions:
        print(f"bertforge: note: --max-length {cfg.max_length} is more than the model's "
              f"{positions} positions; reading {positions} pieces at most.",
              file=sys.stderr)  # fmt: skip
    if trained is not None and length > trained:
        print(f"bertforge: warning: --max-length {cfg.max_length}: the model was trained on "
              f"sequences of up to {trained} pieces, so its positions {trained}-{length - 1} are "
              f"untrained (as initialized): a line's pieces from position {trained} on are read "
              f"at positions it never learned (the default, {trained}, stays within them).",
              file=sys.stderr)  # fmt: skip
    return length


def embed(cfg: EmbedConfig) -> EmbedResult:
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--output: {out} exists; pass --overwrite to replace it.")
    inputs = resolve_inputs([cfg.input], "--input")  # before the model: it takes seconds
    if len(inputs) > 1:  # the rows follow one file's lines: several would run together
        raise UserError(
            f"--input: {cfg.input} names {len(inputs)} files; embed reads one, and its vectors "
            f"follow its lines (here {inputs[0].path}, {inputs[1].path}, ... would run "
            "together): embed each file, or join them first (cat ... > all.txt)."
        )
    loaded = load_model(cfg.model, cfg.device, do_lower_case=cfg.do_lower_case)
    dtype = resolve_precision(cfg.precision, loaded.device)
    num_layers = loaded.model.config.num_hidden_layers
    layers = cfg.layer_indices()
    for layer in layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise UserError(
                f"--layers: the model has {num_layers} layers (0 is the embedding layer, "
                f"{num_layers} or -1 the last); {layer} is out of range."
            )
    max_length = embed_length(cfg, loaded.source)
    hidden = loaded.model.config.hidden_size
    dim = hidden * len(layers) if cfg.combine == "concat" else hidden

    stats = CorpusStats()
    bar = progress_bar(inputs, cfg.progress, "embed")
    progress = Progress(callbacks=[bar.update] if bar else [])
    token_level = cfg.level == "token"
    words_path = out.with_name(out.stem + ".words.txt")
    offsets = [0]
    rows = truncated = 0
    metadata = {
        "model": str(loaded.source.path),
        "level": cfg.level,
        "layers": cfg.layers,
        "combine": cfg.combine,
        "pooling": cfg.resolved_pooling,
        "precision": precision_name(dtype),
    }
    header = NpyHeader() if out.suffix == ".npy" else SafetensorsHeader(metadata, token_level)
    try:
        # Files are renamed into place as the stack closes, last in first out: `out` last.
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(atomic_open(out))
            words_file: IO[str] | None = None
            if token_level:
                words_file = stack.enter_context(atomic_open(words_path, "w"))
            f.write(b" " * header.size)  # rewritten once the number of rows is known
            lines = iter_texts(inputs, stats, text_field=cfg.text_field,
                               strict_utf8=cfg.strict_utf8, progress=progress)  # fmt: skip
            stack.enter_context(autocast_to(dtype, loaded.device))
            for block in blocks(lines, BLOCK_LINES):
                vectors, words, cut = embed_block(loaded, block, cfg, layers, max_length, dim)
                truncated += cut
                for v, w in zip(vectors, words, strict=True):
                    f.write(np.ascontiguousarray(v, dtype="<f4").tobytes())
                    rows += len(v)
                    offsets.append(rows)
                    if words_file is not None:
                        words_file.write(" ".join(w) + "\n")
            if len(offsets) == 1:
                raise UserError(f"--input: {cfg.input} has no lines to embed.")
            offsets_array = np.asarray(offsets, dtype="<i8") if token_level else None
            if isinstance(header, SafetensorsHeader) and offsets_array is not None:
                f.write(offsets_array.tobytes())
            elif offsets_array is not None:
                with atomic_open(out.with_name(out.stem + ".offsets.npy")) as g:
                    np.save(g, offsets_array)
            f.seek(0)
            f.write(header.bytes((rows, dim), len(offsets)))
    finally:
        if bar:
            bar.close()
    result = EmbedResult(out, len(offsets) - 1, rows, dim, truncated)

    # the summary and its warnings whatever --progress says (a bar's flag), as vocab and data do
    def counted(n: int, what: str) -> str:  # "1 line", "3 lines"
        return f"{n:,} {what if n == 1 else what + 's'}"

    read = counted(result.lines, "record" if stats.records else "line")
    made = counted(rows, "word" if token_level else "vector")
    print(f"embed: {read} -> {made} x {dim} -> {out} ({precision_name(dtype)} on "
          f"{loaded.device.type})", file=sys.stderr)  # fmt: skip
    for line in corpus_warnings(stats.as_dict()):
        print(line, file=sys.stderr)
    if truncated:
        print(
            f"  {truncated} line(s) were longer than {max_length} pieces; their "
            "vectors use the first pieces only",
            file=sys.stderr,
        )
    return result


def blocks(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        block.append(line)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def chunks_of(
    line_index: int, ids: list[int], word_ids: list[int | None], limit: int, token_level: bool
) -> tuple[list[Chunk], bool]:
    """Cut a line's pieces into chunks of at most `limit` pieces (at word boundaries at token
    level; sentence level keeps the first chunk). Returns the chunks and whether it was cut."""
    if not token_level:
        return [Chunk(line_index, ids[:limit])], len(ids) > limit
    spans: list[tuple[int, int]] = []
    for i, w in enumerate(word_ids):
        if spans and w is not None and w == word_ids[spans[-1][0]]:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    out: list[Chunk] = []
    for start, end in spans:
        if not out or len(out[-1].ids) + (end - start) > limit:
            out.append(Chunk(line_index, []))
        c = out[-1]
        end = min(end, start + limit)  # a word longer than a pass keeps its first pieces
        c.words.append((len(c.ids), len(c.ids) + end - start))
        c.ids += ids[start:end]
    return out, False


@torch.no_grad()
def embed_block(
    loaded: Loaded,
    lines: list[str],
    cfg: EmbedConfig,
    layers: tuple[int, ...],
    max_length: int,
    dim: int,
) -> tuple[list[np.ndarray], list[list[str]], int]:
    """Vectors (one array per line: 1 row, or one row per word) and the words of each line."""
    token_level = cfg.level == "token"
    encodings = loaded.tokenizer.encode_batch(lines, add_special_tokens=False)
    chunks: list[Chunk] = []
    words: list[list[str]] = []
    cut = 0
    for i, (line, enc) in enumerate(zip(lines, encodings, strict=True)):
        line_chunks, was_cut = chunks_of(i, enc.ids, enc.word_ids, max_length - 2, token_level)
        chunks += line_chunks
        cut += was_cut
        words.append(line_words(line, enc) if token_level else [])
    states: list[np.ndarray] = [np.empty(0)] * len(chunks)
    order = sorted(range(len(chunks)), key=lambda k: len(chunks[k].ids))
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        for k, h in zip(
            batch, forward(loaded, [chunks[k] for k in batch], layers, cfg.combine), strict=True
        ):
            states[k] = h
    vectors: list[np.ndarray] = []
    first = 0
    for i in range(len(lines)):
        last = first
        while last < len(chunks) and chunks[last].line == i:
            last += 1
        parts = list(zip(chunks[first:last], states[first:last], strict=True))
        vectors.append(pool(parts, cfg, token_level, dim))
        first = last
    return vectors, words, cut


def forward(
    loaded: Loaded, batch: list[Chunk], layers: tuple[int, ...], combine: str
) -> list[np.ndarray]:
    """Combined hidden states (pieces + 2, dim) of each chunk, [CLS] first."""
    cls, sep = loaded.vocab.id(CLS), loaded.vocab.id(SEP)
    width = max(len(c.ids) for c in batch) + 2
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    for row, c in enumerate(batch):
        ids[row, : len(c.ids) + 2] = torch.tensor([cls, *c.ids, sep])
    lengths = torch.tensor([len(c.ids) + 2 for c in batch])
    states = loaded.model.hidden_states(ids.to(loaded.device), lengths.to(loaded.device))
    chosen = torch.stack([states[layer] for layer in layers], dim=2)  # (B, S, k, H)
    combined = chosen.flatten(2) if combine == "concat" else chosen.mean(2)
    combined = combined.float().cpu().numpy()
    return [combined[row, : int(n)] for row, n in enumerate(lengths)]


def pool(
    parts: list[tuple[Chunk, np.ndarray]], cfg: EmbedConfig, token_level: bool, dim: int
) -> np.ndarray:
    """One line's rows from its chunks' hidden states ([CLS] at 0, pieces from 1)."""
    how = cfg.resolved_pooling
    if not token_level:
        chunk, h = parts[0]
        if how == "cls":
            return h[:1]
        body = h[1 : 1 + len(chunk.ids)]
        return body.mean(0, keepdims=True) if len(body) else np.zeros((1, h.shape[1]), "f4")
    out = []
    for chunk, h in parts:
        for start, end in chunk.words:
            piece = h[1 + start : 1 + end]
            out.append(piece[0] if how == "first" else piece.mean(0))
    return np.stack(out) if out else np.zeros((0, dim), "f4")


def line_words(line: str, enc: Any) -> list[str]:
    """The text of each word of a line (from the pieces' offsets into the line)."""
    spans: dict[int, list[int]] = {}
    for w, (s, e) in zip(enc.word_ids, enc.offsets, strict=True):
        if w is None:
            continue
        if w in spans:
            spans[w][1] = max(spans[w][1], e)
        else:
            spans[w] = [s, e]
    return [line[s:e].replace(" ", "_") or "_" for s, e in spans.values()]


class NpyHeader:
    """The header of a 2-D little-endian float32 .npy file (format 1.0), reserved at a fixed
    size before the rows are written and filled in after them (numpy reads the padding)."""

    size = 128  # a multiple of 64, as numpy aligns its own

    def bytes(self, shape: tuple[int, int], num_offsets: int) -> bytes:
        text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
        text = text.ljust(self.size - 11) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("ascii")


class SafetensorsHeader:
    """A safetensors header: u64 length, then JSON naming `embeddings` (rows x dim float32)
    and, at token level, `offsets` (i64) after them; padded with spaces to a size fixed before
    the rows are written, large enough for any row count."""

    def __init__(self, metadata: dict[str, str], with_offsets: bool) -> None:
        self.metadata, self.with_offsets = metadata, with_offsets
        widest = self._json((10**15, 10**6), 10**15)  # more rows than any disk holds
        self.size = 8 + len(widest) + (-len(widest) % 8)

    def _json(self, shape: tuple[int, int], num_offsets: int) -> bytes:
        nbytes = shape[0] * shape[1] * 4
        header: dict[str, Any] = {
            "__metadata__": self.metadata,
            "embeddings": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]},
        }
        if self.with_offsets:
            header["offsets"] = {
                "dtype": "I64",
                "shape": [num_offsets],
                "data_offsets": [nbytes, nbytes + 8 * num_offsets],
            }
        return json.dumps(header, separators=(",", ":")).encode()

    def bytes(self, shape: tuple[int, int], num_offsets: int) -> bytes:
        text = self._json(shape, num_offsets).ljust(self.size - 8)
        return struct.pack("<Q", len(text)) + text
