"""TFRecord framing and tf.train.Example codec without TensorFlow."""

from __future__ import annotations

import io

import numpy as np
import pytest

from bertforge.errors import UserError
from bertforge.tfrecord import bert_example, decode_example, encode_example, frame, read_records


def test_roundtrip():
    """Checksums against TensorFlow's own files: tests/reference/test_data_reference.py."""
    recs = [b"", b"hello", bytes(range(256)) * 10]
    data = b"".join(frame(r) for r in recs)
    assert list(read_records(io.BytesIO(data))) == recs
    assert len(frame(b"hello")) == 8 + 4 + 5 + 4


def test_corruption_is_detected():
    data = bytearray(frame(b"payload") + frame(b"second"))
    data[14] ^= 1
    with pytest.raises(UserError, match="record 0 has a bad data checksum"):
        list(read_records(io.BytesIO(bytes(data))))
    with pytest.raises(UserError, match="truncated"):
        list(read_records(io.BytesIO(frame(b"payload")[:-2])))
    data = bytearray(frame(b"payload") + frame(b"second"))
    data[len(frame(b"payload")) + 2] ^= 1  # the second record's length
    with pytest.raises(UserError, match="record 1 has a bad length checksum; corrupt file"):
        list(read_records(io.BytesIO(bytes(data))))


def test_a_file_that_is_no_tfrecord_is_named_so():
    """`train --data corpus.txt` said "record 0 has a bad length checksum; corrupt file"."""
    text = io.BytesIO(b"In the beginning God created the heaven and the earth.\n")
    said = r"^c.txt: not a TFRecord file but text; if it is a corpus, make pretraining data of "
    with pytest.raises(UserError, match=said + r"it first: bertforge data c.txt --vocab"):
        list(read_records(text, "c.txt"))
    with pytest.raises(UserError, match=r"^x.bin: not a TFRecord file \(its first bytes"):
        list(read_records(io.BytesIO(bytes(range(200, 256))), "x.bin"))


def test_a_data_directorys_own_files_given_as_tfrecords_name_the_directory(tmp_path):
    """`train --data 'DIR/*'` on a `bertforge data --format tfrecord` output takes in its
    manifest.json too: the error names the directory to give instead."""
    (tmp_path / "manifest.json").write_text('{"stage": "data"}')
    name = str(tmp_path / "manifest.json")
    said = f"{name}: not a TFRecord file but part of the `bertforge data` output {tmp_path}; "
    with pytest.raises(UserError) as e:
        list(read_records(io.BytesIO(b'{"stage": "data"}'), name))
    assert str(e.value) == said + f"give the directory, --data {tmp_path}, which names its shards."


def test_example_roundtrip():
    ex = {"a": [0, 1, 300, -5, 2**40], "f": [1.0, 0.5, 0.0], "empty": []}
    assert decode_example(encode_example(ex, floats={"f"})) == ex


def test_bert_example_padding():
    rec = decode_example(bert_example([101, 7, 102], [0, 0, 0], [1], [9], True, 6, 3))
    assert rec == {
        "input_ids": [101, 7, 102, 0, 0, 0],
        "input_mask": [1, 1, 1, 0, 0, 0],
        "segment_ids": [0, 0, 0, 0, 0, 0],
        "masked_lm_positions": [1, 0, 0],
        "masked_lm_ids": [9, 0, 0],
        "masked_lm_weights": [1.0, 0.0, 0.0],
        "next_sentence_labels": [1],
    }


def test_batch_encoding_is_bert_example_byte_for_byte():
    """framed_examples (the default mode's batch encoder) gives exactly the bytes of
    frame(bert_example(...)), row by row: ids of 1 to 5 varint bytes, every mask count."""
    from bertforge.tfrecord import framed_examples

    rng = np.random.default_rng(3)
    n, seq, p = 300, 40, 6
    lengths = rng.integers(p + 2, seq + 1, n)
    sep_a = np.array([rng.integers(1, n_ - 2) for n_ in lengths])
    ids = np.zeros((n, seq), dtype=np.int64)
    positions = np.zeros((n, p), dtype=np.int64)
    labels = np.zeros((n, p), dtype=np.int64)
    counts = rng.integers(0, p + 1, n)
    for r in range(n):
        ids[r, : lengths[r]] = rng.choice([5, 200, 40_000, 3_000_000, 300_000_000], lengths[r])
        pos = np.sort(rng.choice(np.arange(1, lengths[r]), counts[r], replace=False))
        positions[r, : counts[r]], labels[r, : counts[r]] = pos, ids[r, pos]
    nsp = rng.integers(0, 2, n)
    got = framed_examples(ids, lengths, sep_a, positions, labels, counts, nsp)
    want = []
    for r in range(n):
        length, c = int(lengths[r]), int(counts[r])
        segment = [0] * (int(sep_a[r]) + 1) + [1] * (length - int(sep_a[r]) - 1)
        want.append(bert_example(ids[r, :length].tolist(), segment, positions[r, :c].tolist(),
                                 labels[r, :c].tolist(), bool(nsp[r]), seq, p))  # fmt: skip
    assert got == b"".join(frame(r) for r in want)
    assert framed_examples(ids[:0], lengths[:0], sep_a[:0], positions[:0], labels[:0],
                           counts[:0], nsp[:0]) == b""  # fmt: skip


def test_packed_varints_of_every_size():
    """The numpy decoder of packed int64 lists agrees with the plain one: 1- to 10-byte
    varints, negative values (10 bytes, two's complement) and empty lists."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        bits = rng.integers(0, 64, rng.integers(0, 40))
        values = [int(rng.integers(0, 1 << int(b))) if b < 63 else -int(rng.integers(1, 1 << 40))
                  for b in bits]  # fmt: skip
        record = encode_example({"x": values}, set())
        assert decode_example(record).get("x", []) == values


def test_bulk_decoding_is_decode_example(tmp_path):
    """datacheck decodes a chunk's lists all at once; it must equal decoding each record
    (packed lists), fall back for unpacked ones, and refuse lists of unequal length."""
    from bertforge.datacheck import _tf_batch, tf_batch_raw

    rng = np.random.default_rng(1)
    n, seq, p = 50, 32, 5
    records = []
    for _ in range(n):
        length = int(rng.integers(8, seq + 1))
        ids = np.zeros(seq, np.int64)
        ids[:length] = rng.integers(0, 40000, length)
        count = int(rng.integers(0, p + 1))
        records.append(encode_example({
            "input_ids": ids, "input_mask": (np.arange(seq) < length).astype(np.int64),
            "segment_ids": ((np.arange(seq) > length // 2) & (np.arange(seq) < length)).astype(
                np.int64),
            "masked_lm_positions": np.r_[rng.integers(1, length, count), np.zeros(p - count)],
            "masked_lm_ids": np.r_[rng.integers(0, 40000, count), np.zeros(p - count)],
            "masked_lm_weights": np.r_[np.ones(count), np.zeros(p - count)],
            "next_sentence_labels": [int(rng.integers(0, 2))],
        }, floats={"masked_lm_weights"}))  # fmt: skip
    bulk = tf_batch_raw(records, "x.tfrecord")
    plain = _tf_batch([decode_example(r) for r in records], "x.tfrecord")
    for field in ("input_ids", "lengths", "segment_ids", "next_sentence", "positions", "labels",
                  "counts"):  # fmt: skip
        assert np.array_equal(getattr(bulk, field), getattr(plain, field)), field
    # One record whose input_ids list is not packed (repeated varints): read the plain way.
    from bertforge.tfrecord import _field, _varint

    unpacked = b"".join(_varint(1 << 3) + _varint(int(v)) for v in range(seq))
    entry = _field(1, b"input_ids") + _field(2, _field(3, unpacked))
    rest = decode_example(records[1])
    del rest["input_ids"]
    odd = _field(1, _field(1, entry)) + encode_example(rest, floats={"masked_lm_weights"})
    assert decode_example(odd)["input_ids"] == list(range(seq))
    mixed = tf_batch_raw([records[0], odd], "x.tfrecord")
    assert mixed.input_ids[1].tolist() == list(range(seq))
    assert np.array_equal(mixed.input_ids[0], plain.input_ids[0])
    short = encode_example({**decode_example(records[0]), "input_ids": [5, 6]},
                           floats={"masked_lm_weights"})  # fmt: skip
    with pytest.raises(UserError, match=r"x.tfrecord, record 7: input_ids has 2 values"):
        tf_batch_raw([*records[:2], short], "x.tfrecord", first=5)
