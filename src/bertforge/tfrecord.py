"""TFRecord files of tf.train.Example records, read and written without TensorFlow.

Written by hand because it is small and a product feature (Google's data must be readable and
writable by bertforge without a TensorFlow install), with the `crc32c` library for checksums.

Framing per record: uint64 length (little endian), masked crc32c of those 8 bytes (uint32),
the data, masked crc32c of the data; mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2^32.

tf.train.Example in protobuf wire format: Example{1: Features{1: map<string, Feature>}}, a map
entry being {1: key, 2: Feature}; Feature{2: FloatList{1: packed float32}, 3: Int64List{1:
packed varint}}. We write the features in the order given (Google's order for BERT data), so
our bytes are stable; protobuf readers accept any order.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import crc32c
import numpy as np

from bertforge.errors import UserError
from bertforge.fileio import output_stages

MASK_DELTA = 0xA282EAD8
FRAMING = 16  # a record's bytes beside its data: its length, the length's crc, the data's crc


def masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One record with its TFRecord framing."""
    return _frame_header(len(record)) + record + struct.pack("<I", masked_crc(record))


@functools.cache
def _frame_header(n: int) -> bytes:
    """uint64 length and its masked crc (records of a shard have few distinct lengths)."""
    length = struct.pack("<Q", n)
    return length + struct.pack("<I", masked_crc(length))


def read_records(f: BinaryIO, name: str = "TFRecord file", check: bool = True) -> Iterator[bytes]:
    """Yield the records of a TFRecord stream, verifying both checksums when check is set."""
    index = 0
    while header := f.read(12):
        if len(header) < 12:
            raise UserError(f"{name}: truncated after record {index} (a partial header).")
        (length,) = struct.unpack("<Q", header[:8])
        if check and struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
            if index == 0:  # no TFRecord at all: a corpus given as data, say
                raise UserError(not_a_tfrecord(name, header))
            raise UserError(f"{name}: record {index} has a bad length checksum; corrupt file.")
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
            raise UserError(f"{name}: truncated in record {index}.")
        if check and struct.unpack("<I", footer)[0] != masked_crc(data):
            raise UserError(f"{name}: record {index} has a bad data checksum; corrupt file.")
        yield data
        index += 1


def not_a_tfrecord(name: str, head: bytes) -> str:
    """The error for a file whose first bytes are no TFRecord header; for one that reads as
    text, what to do with a corpus (train was given `--data corpus.txt`: "record 0 has a bad
    length checksum; corrupt file")."""
    folder = Path(name).parent
    if folder.is_dir() and "data" in output_stages(folder):  # `--data 'DIR/*'`: its manifest too
        return (
            f"{name}: not a TFRecord file but part of the `bertforge data` output {folder}; give "
            f"the directory, --data {folder}, which names its shards."
        )
    try:
        text = head.decode("utf-8").isprintable() or b"\n" in head
    except UnicodeDecodeError:
        text = False
    if text:
        return (
            f"{name}: not a TFRecord file but text; if it is a corpus, make pretraining data of "
            f"it first: bertforge data {name} --vocab VOCAB --output DIR (or bertforge run "
            f"{name} --output DIR for the whole pipeline)."
        )
    return f"{name}: not a TFRecord file (its first bytes are no record header)."


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 as two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: Mapping[str, Sequence[int] | np.ndarray], floats: set[str]) -> bytes:
    """Serialize a tf.train.Example; names in `floats` are FloatLists, the rest Int64Lists."""
    entries = []
    for name, values in features.items():
        if name in floats:
            body = np.asarray(values, dtype="<f4").tobytes()
            feature = _field(2, _field(1, body))
        else:
            body = b"".join(_varint(int(v)) for v in values)
            feature = _field(3, _field(1, body))
        entries.append(_field(1, _field(1, name.encode()) + _field(2, feature)))
    return _field(1, b"".join(entries))


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, payload) of a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = _read_varint(buf, pos)
            yield number, wire, buf[pos : pos + n]
            pos += n
        elif wire == 0:
            v, pos = _read_varint(buf, pos)
            yield number, wire, v
        elif wire == 5:
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def decode_example(record: bytes) -> dict[str, list[int] | list[float]]:
    """Parse a tf.train.Example of Int64Lists and FloatLists (packed or not)."""
    return {name: _decode_feature(feature) for name, feature in _features(record)}


def _features(record: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, Feature message) of each feature of a tf.train.Example."""
    for _, _, features in _fields(record):
        for _, _, entry in _fields(features):  # type: ignore[arg-type]
            name, feature = "", b""
            for number, _, payload in _fields(entry):  # type: ignore[arg-type]
                if number == 1:
                    name = payload.decode()  # type: ignore[union-attr]
                else:
                    feature = payload  # type: ignore[assignment]
            yield name, feature


def example_lists(record: bytes) -> dict[str, bytes] | None:
    """Each feature of a tf.train.Example as its packed list bytes, values not decoded (the
    varints of an Int64List, the float32s of a FloatList). None when a list is not packed
    (then decode_example reads it)."""
    out: dict[str, bytes] = {}
    for name, feature in _features(record):
        lists = [lst for _, _, lst in _fields(feature)]
        inner = list(_fields(lists[0])) if lists else []  # type: ignore[arg-type]
        if len(inner) > 1 or any(wire != 2 for _, wire, _ in inner):
            return None
        out[name] = inner[0][2] if inner else b""  # type: ignore[assignment]
    return out


def varint_values(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """All varints of `data` end to end, decoded at once: (values int64, index of each one's
    last byte). Values of 9 bytes or more (not in BERT data) raise ValueError."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    if len(ends) and int((ends - starts).max()) >= 8:
        raise ValueError("a varint of 9 bytes or more")
    owner = np.repeat(np.arange(len(ends)), ends - starts + 1)
    shift = 7 * (np.arange(len(b)) - starts[owner])
    values = (
        np.add.reduceat((b & 0x7F).astype(np.int64) << shift, starts)
        if len(ends)
        else np.zeros(0, np.int64)
    )
    return values, ends


def _decode_feature(feature: bytes) -> list[int] | list[float]:
    for kind, _, lst in _fields(feature):
        values: list = []
        for _, wire, payload in _fields(lst):  # type: ignore[arg-type]
            if kind == 3:  # Int64List
                if wire == 2:
                    pos = 0
                    while pos < len(payload):  # type: ignore[arg-type]
                        v, pos = _read_varint(payload, pos)  # type: ignore[arg-type]
                        values.append(v - (1 << 64) if v >= 1 << 63 else v)
                else:
                    values.append(payload)
            elif kind == 2:  # FloatList
                values += np.frombuffer(payload, dtype="<f4").tolist()  # type: ignore[arg-type]
        return values
    return []


BERT_FEATURES = (
    "input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
    "masked_lm_weights", "next_sentence_labels",
)  # fmt: skip


def bert_example(
    input_ids: Sequence[int],
    segment_ids: Sequence[int],
    masked_lm_positions: Sequence[int],
    masked_lm_ids: Sequence[int],
    is_random_next: bool,
    max_seq_length: int,
    max_predictions_per_seq: int,
) -> bytes:
    """A pretraining record exactly as Google's write_instance_to_example_files builds it."""
    n, m = len(input_ids), len(masked_lm_positions)
    assert n <= max_seq_length and m <= max_predictions_per_seq, (n, m)
    pad, pad_m = [0] * (max_seq_length - n), [0] * (max_predictions_per_seq - m)
    features = {
        "input_ids": [*input_ids, *pad],
        "input_mask": [1] * n + pad,
        "segment_ids": [*segment_ids, *pad],
        "masked_lm_positions": [*masked_lm_positions, *pad_m],
        "masked_lm_ids": [*masked_lm_ids, *pad_m],
        "masked_lm_weights": [1.0] * m + [0.0] * (max_predictions_per_seq - m),
        "next_sentence_labels": [1 if is_random_next else 0],
    }
    return encode_example(features, floats={"masked_lm_weights"})


_VARINT = [_varint(i) for i in range(1 << 14)]  # lengths of fields and small values


def _varint_rows(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Packed varints of each row of a non-negative [n, k] array: (all bytes, row offsets)."""
    v = values.astype(np.uint32)
    top = int(v.max(initial=0))
    planes, keep = [], []
    for j in range(5):
        if j and top < 1 << (7 * j):
            break
        more = v >= (1 << (7 * (j + 1))) if j < 4 else np.zeros_like(v, dtype=bool)
        planes.append(((v >> (7 * j)) & 0x7F).astype(np.uint8) | (more.astype(np.uint8) << 7))
        keep.append(v >= (1 << (7 * j)) if j else np.ones_like(v, dtype=bool))
    stacked, kept = np.stack(planes, axis=-1), np.stack(keep, axis=-1)
    flat = stacked[kept].tobytes()  # row-major: rows stay contiguous
    offsets = np.concatenate([[0], np.cumsum(kept.sum(axis=(1, 2)))])
    return flat, offsets


def _entry_prefix(name: str, kind: int) -> tuple[bytes, bytes]:
    """(map-entry key field, feature kind tag) for a feature name."""
    return _field(1, name.encode()), bytes([kind << 3 | 2])


def _wrap(key: bytes, kind_tag: bytes, packed: bytes) -> bytes:
    """A map entry {1: name, 2: Feature{kind: List{1: packed}}} around packed values."""
    inner = b"\x0a" + _VARINT[len(packed)] + packed
    feature = kind_tag + _VARINT[len(inner)] + inner
    body = key + b"\x12" + _VARINT[len(feature)] + feature
    return b"\x0a" + _VARINT[len(body)] + body


_PREFIX = {name: _entry_prefix(name, 2 if name == "masked_lm_weights" else 3)
           for name in BERT_FEATURES}  # fmt: skip
_CRC_SLOT = b"\x00" * 4  # where a record's crc goes until it is computed


@functools.cache
def _entry_head(name: str, n: int) -> bytes:
    """A feature's map entry up to its n bytes of packed values."""
    return _wrap(*_PREFIX[name], b"\xff" * n)[: -n or None]


@functools.cache
def _shape_entries(seq: int, length: int, sep: int) -> bytes:
    """The input_mask and segment_ids entries of a record (length, first [SEP] at sep)."""
    mask = b"\x01" * length + b"\x00" * (seq - length)
    segment = b"\x00" * (sep + 1) + b"\x01" * (length - sep - 1) + b"\x00" * (seq - length)
    return _wrap(*_PREFIX["input_mask"], mask) + _wrap(*_PREFIX["segment_ids"], segment)


@functools.cache
def _tail_entries(p: int, count: int, nsp: int) -> bytes:
    """The masked_lm_weights and next_sentence_labels entries of a record."""
    weights = (np.arange(p) < count).astype("<f4").tobytes()
    return _wrap(*_PREFIX["masked_lm_weights"], weights) + _wrap(
        *_PREFIX["next_sentence_labels"], _VARINT[nsp]
    )


def _per_row(keys: np.ndarray, make: Any) -> tuple[list[bytes], np.ndarray]:
    """make(key) for each row's key, built once per distinct key: (bytes, their lengths)."""
    distinct, inverse = np.unique(keys, return_inverse=True)
    built = [make(k) for k in distinct.tolist()]
    lengths = np.fromiter(map(len, built), np.int64, len(built))
    return list(map(built.__getitem__, inverse.tolist())), lengths[inverse]


def _row_slices(blob: bytes, offsets: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """blob cut at offsets (n + 1 of them): (the n pieces, their lengths)."""
    cuts = map(slice, offsets[:-1].tolist(), offsets[1:].tolist())
    return list(map(blob.__getitem__, cuts)), np.diff(offsets)


def framed_examples(
    input_ids: np.ndarray,
    lengths: np.ndarray,
    sep_a: np.ndarray,
    positions: np.ndarray,
    labels: np.ndarray,
    counts: np.ndarray,
    next_sentence_labels: np.ndarray,
) -> bytes:
    """frame(bert_example(...)) for each row of a batch of padded arrays, end to end, byte for
    byte, with no Python loop over records.

    A framed record is a fixed sequence of byte segments: frame header, Example header, then
    per feature a map-entry header and the packed values, then the crc. The varying values
    (input_ids, masked_lm_positions, masked_lm_ids) are varint-encoded for the whole batch at
    once; every other segment depends on one small key (a byte length; (length, sep_a) for
    input_mask + segment_ids; (count, label) for masked_lm_weights + next_sentence_labels) and
    is built once per distinct key. One join assembles the records; the crcs are written in
    afterwards."""
    seq, p = input_ids.shape[1], positions.shape[1]
    n = len(lengths)
    body: list[tuple[list[bytes], np.ndarray]] = []  # the Example's segments, in order
    for values, name in ((input_ids, "input_ids"), (positions, "masked_lm_positions"),
                         (labels, "masked_lm_ids")):  # fmt: skip
        packed = _row_slices(*_varint_rows(values))
        body += [_per_row(packed[1], functools.partial(_entry_head, name)), packed]
    body.insert(2, _per_row(lengths * (seq + 1) + sep_a,
                            lambda k: _shape_entries(seq, *divmod(k, seq + 1))))  # fmt: skip
    body.append(_per_row(counts * 2 + next_sentence_labels,
                         lambda k: _tail_entries(p, *divmod(k, 2))))  # fmt: skip
    body_len = sum(sizes for _, sizes in body)
    example_head = _per_row(body_len, lambda n: b"\x0a" + _varint(n))
    record = body_len + example_head[1]
    segments = [_per_row(record, _frame_header)[0], example_head[0], *(b for b, _ in body)]
    pieces: list[bytes] = [_CRC_SLOT] * ((len(segments) + 1) * n)
    for k, seg in enumerate(segments):
        pieces[k :: len(segments) + 1] = seg
    out = bytearray(b"".join(pieces))
    ends = np.cumsum(record + 16)  # a framed record: 12 header bytes, the record, 4 crc bytes
    view = memoryview(out)
    cuts = map(slice, (ends - 4 - record).tolist(), (ends - 4).tolist())
    crc = np.fromiter(map(masked_crc, map(view.__getitem__, cuts)), np.uint32, n)
    np.frombuffer(out, np.uint8)[(ends - 4)[:, None] + np.arange(4)] = (
        crc.astype("<u4").view(np.uint8).reshape(-1, 4)
    )
    view.release()
    return bytes(out)
