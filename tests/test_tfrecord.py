"""TFRecord framing and tf.train.Example codec without TensorFlow."""

from __future__ import annotations

import io

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
