"""Read and write TensorFlow checkpoints (tensor bundles) without TensorFlow.

Written here because the only reader and writer is TensorFlow itself (transformers 5 dropped
its TF loader, and 4.x's needs TensorFlow installed). A checkpoint `PREFIX` is two files:
- PREFIX.index: a LevelDB-format table (sorted key -> value blocks, an index block and a
  48-byte footer). Key "" holds a BundleHeaderProto; every other key is a variable name whose
  value is a BundleEntryProto: dtype, shape, shard_id, offset, size, crc32c.
- PREFIX.data-SSSSS-of-NNNNN: the tensors' raw little-endian bytes at those offsets.
Only what BERT checkpoints use is supported: uncompressed index blocks, numeric dtypes; the
writer writes float32 tensors into one shard, as Google's released checkpoints are.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertforge.errors import UserError
from bertforge.fileio import atomic_open
from bertforge.tfrecord import _field, masked_crc
from bertforge.tfrecord import _read_varint as _varint
from bertforge.tfrecord import _varint as _encode_varint

FOOTER_BYTES = 48
TABLE_MAGIC = 0xDB4775248B80FB57
DTYPES = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    14: "bfloat16",
    19: "<f2",
}


@dataclass(frozen=True)
class Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Protobuf wire format: (field number, value) pairs; length-delimited values as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out.append((number, value))
    return out


def _entry(value: bytes) -> Entry:
    dtype = shard = offset = size = 0
    shape: list[int] = []
    crc = None
    for number, v in _fields(value):
        if number == 1:
            dtype = int(v)  # type: ignore[arg-type]
        elif number == 2:
            for n, dim in _fields(v):  # type: ignore[arg-type]
                if n == 2:
                    shape.append(next((int(x) for k, x in _fields(dim) if k == 1), 0))  # type: ignore[arg-type]
        elif number == 3:
            shard = int(v)  # type: ignore[arg-type]
        elif number == 4:
            offset = int(v)  # type: ignore[arg-type]
        elif number == 5:
            size = int(v)  # type: ignore[arg-type]
        elif number == 6:
            crc = int(v)  # type: ignore[arg-type]
    return Entry(dtype, tuple(shape), shard, offset, size, crc)


def _block(data: bytes, handle: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """The entries of the table block `handle` points at, after its trailer's checks: the
    compression byte (0: none) and the masked crc32c of the block and that byte."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    block, trailer = data[offset : offset + size], data[offset + size : offset + size + 5]
    if len(block) != size or len(trailer) != 5:
        raise ValueError("a block runs past the end of the file")
    if masked_crc(block + trailer[:1]) != struct.unpack("<I", trailer[1:])[0]:
        raise ValueError("a block fails its checksum")
    if trailer[0] != 0:
        raise UserError(f"{path}: compressed index blocks are not supported.")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    entries, key, pos = [], b"", 0
    while pos < end:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + length]))
        pos += length
    return entries


def resolve_prefix(path: str | Path) -> Path:
    """PREFIX from PREFIX, PREFIX.index, PREFIX.data-..., or a directory: the latest checkpoint
    its `checkpoint` state file names (run_pretraining.py's output directory), else its one
    checkpoint."""
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
        found = sorted(p.glob("*.index"))
        if len(found) != 1:
            raise UserError(
                f"{p}: expected one TensorFlow checkpoint (*.index), found "
                f"{len(found)}; give its prefix, e.g. {p}/bert_model.ckpt."
            )
        return found[0].with_suffix("")
    name = p.name
    if name.endswith(".index"):
        return p.with_name(name[: -len(".index")])
    if ".data-" in name:
        return p.with_name(name.split(".data-")[0])
    return p


def latest_checkpoint(directory: Path) -> Path | None:
    """The prefix named by `model_checkpoint_path` in DIRECTORY/checkpoint, the text state
    file TensorFlow's Saver and Estimator keep (None without one). The name may be relative
    or absolute (from another machine or bucket): its file name is looked up in DIRECTORY
    first, the directory given being the one that was copied or moved."""
    state = directory / "checkpoint"
    if not state.is_file():
        return None
    text = state.read_text(encoding="utf-8", errors="replace")
    found = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', text, re.MULTILINE)
    if found is None:
        return None
    name = found.group(1)
    with contextlib.suppress(UnicodeError, ValueError):  # text-proto escapes (\303\274) undone
        name = name.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    for prefix in (directory / Path(name).name, directory / name):
        if prefix.with_name(prefix.name + ".index").is_file():
            return prefix
    raise UserError(
        f"{state}: names the checkpoint {name}, which is not in {directory} "
        f"(no {Path(name).name}.index); give the prefix of one that is there, "
        f"e.g. {directory}/model.ckpt-NNNN."
    )


def read_index(prefix: Path) -> dict[str, Entry]:
    index = prefix.with_name(prefix.name + ".index")
    try:
        data = index.read_bytes()
    except OSError as e:
        raise UserError(f"{index}: cannot read the checkpoint index ({e}).") from None
    if len(data) < FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
        raise UserError(f"{index}: not a TensorFlow checkpoint index (bad footer).")
    footer = data[-FOOTER_BYTES:]
    entries: dict[str, Entry] = {}
    try:
        _, pos = _varint(footer, 0)  # metaindex handle: offset, size (unused)
        _, pos = _varint(footer, pos)
        for _, handle in _block(data, footer[pos:], index):
            for key, value in _block(data, handle, index):
                if key:  # "" is the bundle header
                    entries[key.decode("utf-8")] = _entry(value)
    except (ValueError, IndexError, struct.error) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(
            f"{index}: the checkpoint index is damaged ({e}); download or copy it again."
        ) from None
    return entries


def read_checkpoint(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Every numeric variable (or those `keep` accepts) of a TF checkpoint, as numpy arrays.

    The data files are memory-mapped and only the kept tensors are read: run_pretraining's
    checkpoints hold two Adam slots per weight, twice the weights' size, that a reader of the
    weights never needs in memory."""
    prefix = resolve_prefix(path)
    entries = {
        name: e
        for name, e in read_index(prefix).items()
        if e.dtype in DTYPES and (keep is None or keep(name))
    }
    total = _count(prefix)
    out: dict[str, np.ndarray] = {}
    with contextlib.ExitStack() as stack:
        files: dict[int, mmap.mmap | bytes] = {}
        for s in sorted({e.shard for e in entries.values()}):
            f = prefix.with_name(f"{prefix.name}.data-{s:05d}-of-{total:05d}")
            try:
                fh = stack.enter_context(open(f, "rb"))
                size = os.fstat(fh.fileno()).st_size
                files[s] = (
                    stack.enter_context(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
                    if size
                    else b""
                )
            except OSError as e:
                raise UserError(f"{f}: cannot read the checkpoint data ({e}).") from None
        for name, e in entries.items():
            raw = files[e.shard][e.offset : e.offset + e.size]
            if len(raw) != e.size:
                raise UserError(
                    f"{prefix}: variable {name} lies beyond the end of its data file; the "
                    "checkpoint is truncated (download or copy it again)."
                )
            if e.crc is not None and masked_crc(raw) != e.crc:
                raise UserError(
                    f"{prefix}: variable {name} fails its checksum; the checkpoint "
                    "is damaged (download it again)."
                )
            if DTYPES[e.dtype] == "bfloat16":
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                arr = np.frombuffer(bytearray(raw), dtype=DTYPES[e.dtype])  # writable
            if arr.size != (expected := int(np.prod(e.shape))):
                raise UserError(
                    f"{prefix}: variable {name} holds {arr.size} values, its shape "
                    f"{list(e.shape)} {expected}; the index is damaged."
                )
            out[name] = arr.reshape(e.shape)
    return out


def _count(prefix: Path) -> int:
    found = sorted(prefix.parent.glob(f"{prefix.name}.data-*-of-*"))
    if not found:
        raise UserError(f"{prefix}: no {prefix.name}.data-00000-of-NNNNN beside the index.")
    return int(found[0].name.rsplit("-of-", 1)[1])


def write_checkpoint(prefix: Path, tensors: dict[str, np.ndarray]) -> list[Path]:
    """Write float32 `tensors` as the TF checkpoint PREFIX (PREFIX.index and
    PREFIX.data-00000-of-00001, each atomically); returns the two paths."""
    data_path = prefix.with_name(f"{prefix.name}.data-00000-of-00001")
    entries: list[tuple[bytes, bytes]] = []
    offset = 0
    with atomic_open(data_path, "wb") as f:
        for name in sorted(tensors):
            raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
            f.write(raw)
            shape = b"".join(_field(2, _encode_varint(1 << 3) + _encode_varint(n))
                             for n in tensors[name].shape)  # fmt: skip
            entry = (_encode_varint(1 << 3) + _encode_varint(1)  # dtype: DT_FLOAT
                     + _field(2, shape)
                     + _encode_varint(4 << 3) + _encode_varint(offset)
                     + _encode_varint(5 << 3) + _encode_varint(len(raw))
                     + _encode_varint(6 << 3 | 5) + struct.pack("<I", masked_crc(raw)))  # fmt: skip
            entries.append((name.encode("utf-8"), entry))
            offset += len(raw)
    # BundleHeaderProto: num_shards 1, little-endian (the default), version {producer: 1}
    header = (
        _encode_varint(1 << 3) + _encode_varint(1) + _field(3, _encode_varint(1 << 3) + b"\x01")
    )
    table = bytearray()

    def add_block(items: list[tuple[bytes, bytes]]) -> bytes:
        """Append a block (every entry a restart point, no compression); its handle."""
        body = bytearray()
        restarts = []
        for key, value in items:
            restarts.append(len(body))
            body += _encode_varint(0) + _encode_varint(len(key)) + _encode_varint(len(value))
            body += key + value
        for r in restarts or [0]:
            body += struct.pack("<I", r)
        body += struct.pack("<I", len(restarts or [0]))
        handle = _encode_varint(len(table)) + _encode_varint(len(body))
        table.extend(body + b"\x00" + struct.pack("<I", masked_crc(bytes(body) + b"\x00")))
        return handle

    last = entries[-1][0] if entries else b""
    data_handle = add_block([(b"", header), *entries])
    meta_handle = add_block([])
    index_handle = add_block([(last, data_handle)])
    footer = meta_handle + index_handle
    table += footer + b"\x00" * (FOOTER_BYTES - 8 - len(footer)) + struct.pack("<Q", TABLE_MAGIC)
    index_path = prefix.with_name(f"{prefix.name}.index")
    with atomic_open(index_path, "wb") as f:
        f.write(bytes(table))
    return [index_path, data_path]


# Google's head variables whose names do not follow the layer naming, and transformers' names.
GOOGLE_HEADS = {
    "cls/predictions/output_bias": "cls.predictions.bias",
    "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",
    "cls/seq_relationship/output_bias": "cls.seq_relationship.bias",
}


def google_to_hf_name(name: str) -> str | None:
    """transformers' name of a Google BERT variable (None for optimizer slots, global_step)."""
    if name.endswith(("adam_m", "adam_v")) or name == "global_step":
        return None
    if name in GOOGLE_HEADS:
        return GOOGLE_HEADS[name]
    parts = name.split("/")
    if parts[-1] in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        parts.append("weight")
    leaf = {
        "kernel": "weight",
        "gamma": "weight",
        "beta": "bias",
        "bias": "bias",
        "weight": "weight",
    }
    if parts[-1] not in leaf:
        return None
    parts[-1] = leaf[parts[-1]]
    parts = [p.replace("layer_", "layer.") if p.startswith("layer_") else p for p in parts]
    return ".".join(parts)


def hf_to_google_name(name: str) -> str | None:
    """Google's name of a transformers BertForPreTraining weight (None for the decoder weight,
    which Google ties to the word embeddings, and for buffers); inverse of google_to_hf_name."""
    heads = {hf: google for google, hf in GOOGLE_HEADS.items()}
    if name in heads:
        return heads[name]
    if name.startswith("cls.predictions.decoder.") or name.endswith("position_ids"):
        return None
    joined: list[str] = []
    for p in name.split("."):
        if joined and joined[-1] == "layer" and p.isdigit():
            joined[-1] = f"layer_{p}"
        else:
            joined.append(p)
    *scope, leaf = joined
    if scope[-1].endswith("_embeddings"):
        return "/".join(scope)
    if scope[-1] == "LayerNorm":
        return "/".join([*scope, {"weight": "gamma", "bias": "beta"}[leaf]])
    return "/".join([*scope, {"weight": "kernel", "bias": "bias"}[leaf]])


def google_tensors(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' BertForPreTraining weights as a Google checkpoint's variables (kernels
    transposed back to [in, out])."""
    out = {}
    for name, arr in hf.items():
        google = hf_to_google_name(name)
        if google is not None:
            out[google] = arr.T if google.endswith("/kernel") else arr
    return out


def google_weights(path: str | Path, slot: str = "") -> dict[str, np.ndarray]:
    """A Google BERT checkpoint in transformers' BertForPreTraining names (kernels transposed);
    optimizer slots and the step counter are not read. slot "/adam_m" or "/adam_v": instead
    of the weights, the Adam moments run_pretraining.py keeps for each (WEIGHT/adam_m)."""

    def hf_name(name: str) -> str | None:
        return google_to_hf_name(name[: len(name) - len(slot)]) if name.endswith(slot) else None

    tensors = read_checkpoint(path, keep=lambda name: hf_name(name) is not None)
    out = {}
    for name in list(tensors):
        arr = tensors.pop(name)  # each tensor held once: the transposed copy replaces it
        hf = hf_name(name)
        assert hf is not None
        kernel = name[: len(name) - len(slot)].endswith("/kernel")
        out[hf] = np.ascontiguousarray(arr.T) if kernel else arr
    if "bert.embeddings.word_embeddings.weight" not in out:
        raise UserError(not_google_bert(path, slot))
    return out


def not_google_bert(path: str | Path, slot: str) -> str:
    """Why a checkpoint without bert/embeddings/word_embeddings cannot be read, with the names
    it holds instead (a TensorFlow 2 checkpoint's object paths are told apart)."""
    what = f"bert/embeddings/word_embeddings{slot}"
    names = sorted(read_index(resolve_prefix(path)))
    objects = [name for name in names if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
    if objects:
        return (
            f"{path}: a TensorFlow 2 checkpoint (object paths such as {objects[0]}), not one of "
            f"Google's BERT checkpoints (names such as {what}, as run_pretraining.py writes and "
            "Google's released models have). Convert it to a transformers model directory "
            "(transformers 4.x's convert_bert_original_tf2_checkpoint_to_pytorch does, for "
            "TF Model Garden BERT) and give that directory instead."
        )
    found = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "nothing"
    return (
        f"{path}: no {what}; not a BERT checkpoint{' of a run' if slot else ''} (its variables: "
        f"{found})."
    )


def global_step(path: str | Path) -> int | None:
    """The checkpoint's global_step (None without one: Google's released checkpoints)."""
    found = read_checkpoint(path, keep=lambda name: name == "global_step")
    return int(found["global_step"]) if "global_step" in found else None
