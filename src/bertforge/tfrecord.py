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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO

import crc32c
import numpy as np

from bertforge.errors import UserError

MASK_DELTA = 0xA282EAD8


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


def frame_all(records: Iterable[bytes]) -> bytes:
    """The records framed, end to end."""
    pack = struct.Struct("<I").pack
    parts = []
    for r in records:  # frame()'s pieces, joined once instead of per record
        parts += (_frame_header(len(r)), r, pack(masked_crc(r)))
    return b"".join(parts)


def read_records(f: BinaryIO, name: str = "TFRecord file", check: bool = True) -> Iterator[bytes]:
    """Yield the records of a TFRecord stream, verifying both checksums when check is set."""
    index = 0
    while header := f.read(12):
        if len(header) < 12:
            raise UserError(f"{name}: truncated after record {index} (a partial header).")
        (length,) = struct.unpack("<Q", header[:8])
        if check and struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
            raise UserError(f"{name}: record {index} has a bad length checksum; corrupt file.")
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
            raise UserError(f"{name}: truncated in record {index}.")
        if check and struct.unpack("<I", footer)[0] != masked_crc(data):
            raise UserError(f"{name}: record {index} has a bad data checksum; corrupt file.")
        yield data
        index += 1


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
    out: dict[str, list[int] | list[float]] = {}
    for _, _, features in _fields(record):
        for _, _, entry in _fields(features):  # type: ignore[arg-type]
            name, feature = "", b""
            for number, _, payload in _fields(entry):  # type: ignore[arg-type]
                if number == 1:
                    name = payload.decode()  # type: ignore[union-attr]
                else:
                    feature = payload  # type: ignore[assignment]
            out[name] = _decode_feature(feature)
    return out


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


class _Heads(dict):  # type: ignore[type-arg]
    """Memo of what goes before n bytes of packed values: a feature's map entry header, or
    with no key the Example's own (field 1, length n)."""

    def __init__(self, key: bytes | None, kind_tag: bytes | None) -> None:
        super().__init__()
        self.key, self.kind_tag = key, kind_tag

    def __missing__(self, n: int) -> bytes:
        if self.key is None or self.kind_tag is None:
            head = b"\x0a" + _varint(n)
        else:
            head = _wrap(self.key, self.kind_tag, b"\xff" * n)[:-n]
        self[n] = head
        return head


_PREFIX = {name: _entry_prefix(name, 2 if name == "masked_lm_weights" else 3)
           for name in BERT_FEATURES}  # fmt: skip


def bert_examples(
    input_ids: np.ndarray,
    lengths: np.ndarray,
    sep_a: np.ndarray,
    positions: np.ndarray,
    labels: np.ndarray,
    counts: np.ndarray,
    next_sentence_labels: np.ndarray,
) -> list[bytes]:
    """bert_example() for a batch of padded arrays, byte for byte.

    The varying features are varint-encoded for the whole batch at once; input_mask,
    segment_ids, masked_lm_weights and next_sentence_labels depend only on (length, sep_a,
    count, label), so their encoded map entries are built once per distinct value."""
    seq, p = input_ids.shape[1], positions.shape[1]
    ids_bytes, ids_off = _varint_rows(input_ids)
    pos_bytes, pos_off = _varint_rows(positions)
    lab_bytes, lab_off = _varint_rows(labels)
    (k_ids, t_ids), (k_mask, t_mask), (k_seg, t_seg), (k_pos, t_pos), (k_lab, t_lab), \
        (k_w, t_w), (k_nsp, t_nsp) = (_PREFIX[name] for name in BERT_FEATURES)  # fmt: skip
    # input_mask + segment_ids depend on (length, sep_a) only, masked_lm_weights +
    # next_sentence_labels on (count, label): each pair's bytes are built once.
    shape_entries: dict[tuple[int, int], bytes] = {}
    tail_entries: dict[tuple[int, int], bytes] = {}
    # An entry of packed values is (prefix depending only on the values' byte length, values):
    # the prefixes are built once per length.
    ids_head, pos_head, lab_head = _Heads(k_ids, t_ids), _Heads(k_pos, t_pos), _Heads(k_lab, t_lab)
    example_head = _Heads(None, None)
    out = []
    rows = zip(
        lengths.tolist(),
        sep_a.tolist(),
        counts.tolist(),
        next_sentence_labels.tolist(),
        *(o[:-1].tolist() for o in (ids_off, pos_off, lab_off)),  # where each row starts
        *(o[1:].tolist() for o in (ids_off, pos_off, lab_off)),  # and ends
        strict=True,
    )
    for length, sep, count, nsp, i0, p0, l0, i1, p1, l1 in rows:
        shape = shape_entries.get((length, sep))
        if shape is None:
            mask = b"\x01" * length + b"\x00" * (seq - length)
            segment = b"\x00" * (sep + 1) + b"\x01" * (length - sep - 1) + b"\x00" * (seq - length)
            shape = _wrap(k_mask, t_mask, mask) + _wrap(k_seg, t_seg, segment)
            shape_entries[(length, sep)] = shape
        tail = tail_entries.get((count, nsp))
        if tail is None:
            weights = (np.arange(p) < count).astype("<f4").tobytes()
            tail = _wrap(k_w, t_w, weights) + _wrap(k_nsp, t_nsp, _VARINT[nsp])
            tail_entries[(count, nsp)] = tail
        ids, pos, lab = ids_bytes[i0:i1], pos_bytes[p0:p1], lab_bytes[l0:l1]
        body = b"".join((ids_head[len(ids)], ids, shape, pos_head[len(pos)], pos,
                         lab_head[len(lab)], lab, tail))  # fmt: skip
        out.append(example_head[len(body)] + body)
    return out
