"""bertforge's native shard format: fixed-size records a trainer memory-maps with numpy alone.

Written here because it is the product's own format. A shard is

    bytes 0-7    magic b"BFSHARD\\0"
    bytes 8-11   format version, uint32 little endian (1)
    bytes 12-15  header length H, uint32 little endian
    bytes 16-    H bytes of UTF-8 JSON, padded with spaces so records start at a multiple of 64
    then         num_records fixed-size records (a packed numpy structured dtype)

The JSON holds num_records, the record dtype as a list of [name, dtype, shape], and the data
settings (max_seq_length, max_predictions_per_seq, static_masking, vocab_size). Reading one:

    header = json.loads(raw[16 : 16 + header_length]); offset = ceil64(16 + header_length)
    records = np.memmap(path, dtype=np.dtype([(n, d, tuple(s)) for n, d, s in header["dtype"]]),
                        mode="r", offset=offset, shape=(header["num_records"],))

Records hold instances before masking: `input_ids` ([CLS] A [SEP] B [SEP], 0-padded),
`length` (real tokens), `sep_a` (index of the first [SEP]) and `next_sentence_label` (1 when
B is a random segment). Segment ids follow: 1 for sep_a < i < length. With static masking,
`input_ids` is already masked and `masked_lm_positions`, `masked_lm_ids` and `num_masked` are
stored too. Token ids are uint16 when the vocabulary has at most 65,536 entries, else uint32.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bertforge.errors import UserError

MAGIC = b"BFSHARD\0"
VERSION = 1
ALIGN = 64


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def record_dtype(
    vocab_size: int, max_seq_length: int, max_predictions_per_seq: int, static_masking: bool
) -> np.dtype:
    ids = id_dtype(vocab_size)
    fields: list[tuple[str, Any, tuple[int, ...]]] = [
        ("input_ids", ids, (max_seq_length,)),
        ("length", np.dtype("<u2"), ()),
        ("sep_a", np.dtype("<u2"), ()),
        ("next_sentence_label", np.dtype("u1"), ()),
    ]
    if static_masking:
        fields += [
            ("masked_lm_positions", np.dtype("<u2"), (max_predictions_per_seq,)),
            ("masked_lm_ids", ids, (max_predictions_per_seq,)),
            ("num_masked", np.dtype("<u2"), ()),
        ]
    return np.dtype(fields)


def _describe(dtype: np.dtype) -> list[list[Any]]:
    out = []
    for name in dtype.names or ():
        sub = dtype.fields[name][0]  # type: ignore[index]
        base, shape = (sub.base, list(sub.shape)) if sub.shape else (sub, [])
        out.append([name, base.str, shape])
    return out


def _dtype_from(description: list[list[Any]]) -> np.dtype:
    return np.dtype([(name, np.dtype(d), tuple(shape)) for name, d, shape in description])


@dataclass(frozen=True)
class ShardHeader:
    num_records: int
    dtype: np.dtype
    offset: int  # byte offset of the first record
    meta: dict[str, Any]  # everything in the JSON

    @property
    def static_masking(self) -> bool:
        return "masked_lm_positions" in (self.dtype.names or ())


def encode_header(records: np.ndarray, meta: dict[str, Any]) -> bytes:
    body = dict(meta, num_records=len(records), dtype=_describe(records.dtype),
                record_bytes=records.dtype.itemsize)  # fmt: skip
    text = json.dumps(body, sort_keys=True).encode()
    size = 16 + len(text)
    text += b" " * (-size % ALIGN)
    return MAGIC + struct.pack("<II", VERSION, len(text)) + text


def write_shard(f: BinaryIO, records: np.ndarray, meta: dict[str, Any]) -> None:
    """Header + records; `records` must have a dtype from record_dtype()."""
    f.write(encode_header(records, meta))
    f.write(np.ascontiguousarray(records).tobytes())


def read_header(path: str | Path) -> ShardHeader:
    """The header of a shard, checked: magic, version, and a size that fits the records."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise UserError(f"{p}: not a bertforge shard (bad magic); was it written by "
                            "`bertforge data`?")  # fmt: skip
        version, length = struct.unpack("<II", head[8:])
        if version > VERSION:
            raise UserError(f"{p}: shard format version {version} is newer than this "
                            f"bertforge reads ({VERSION}); upgrade bertforge.")  # fmt: skip
        try:
            meta = json.loads(f.read(length))
            dtype = _dtype_from(meta["dtype"])
            num = int(meta["num_records"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{p}: damaged shard header ({e}).") from None
    offset = 16 + length
    expected = offset + num * dtype.itemsize
    actual = p.stat().st_size
    if actual != expected:
        raise UserError(f"{p}: {actual} bytes where the header promises {expected} "
                        f"({num} records); the shard is truncated or damaged.")  # fmt: skip
    return ShardHeader(num, dtype, offset, meta)


def open_shard(path: str | Path) -> tuple[ShardHeader, np.ndarray]:
    """Header and a read-only memory map of the records."""
    header = read_header(path)
    if header.num_records == 0:
        return header, np.zeros(0, dtype=header.dtype)
    records = np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset,
                        shape=(header.num_records,))  # fmt: skip
    return header, records


def segment_ids(records: np.ndarray) -> np.ndarray:
    """[n, seq] segment ids of records (0 for [CLS] A [SEP] and padding, 1 for B [SEP])."""
    seq = records["input_ids"].shape[1]
    pos = np.arange(seq)
    length = records["length"].astype(np.int64)[:, None]
    return ((pos > records["sep_a"].astype(np.int64)[:, None]) & (pos < length)).astype(np.int64)
