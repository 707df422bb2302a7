"""Pretraining data creation (`bertforge data`): corpus -> tokenized documents -> instances.

This first part holds the Google-compatible path: documents read exactly as Google's script
reads them, instances from instances.py, records written as Google writes them. The streaming,
parallel default mode builds on the same pieces.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from bertforge.corpus import CorpusStats, InputFile, iter_documents
from bertforge.fileio import atomic_open
from bertforge.instances import Instance, InstanceParams, VocabIds, create_training_instances
from bertforge.tfrecord import bert_example, frame


def tokenized_documents(
    inputs: Sequence[InputFile],
    tokenizer: Tokenizer,
    stats: CorpusStats,
    *,
    strict_utf8: bool = False,
    file_is_document_boundary: bool = True,
) -> Iterator[list[list[int]]]:
    """Documents as lists of sentences of token ids; sentences that tokenize to nothing and
    documents left empty are dropped, as in Google's script."""
    for doc in iter_documents(
        inputs, stats, strict_utf8=strict_utf8, file_is_document_boundary=file_is_document_boundary
    ):
        encodings = tokenizer.encode_batch(doc, add_special_tokens=False)
        sentences = [e.ids for e in encodings if e.ids]
        if sentences:
            yield sentences


def google_instances(
    inputs: Sequence[InputFile],
    tokenizer: Tokenizer,
    vocab: VocabIds,
    params: InstanceParams,
    dupe_factor: int,
    random_seed: int,
    stats: CorpusStats,
    strict_utf8: bool = False,
) -> list[Instance]:
    """Google's create_training_instances, record for record: all in memory, one rng."""
    documents = list(
        tokenized_documents(
            inputs, tokenizer, stats, strict_utf8=strict_utf8, file_is_document_boundary=False
        )
    )
    return create_training_instances(
        documents, params, vocab, dupe_factor, random.Random(random_seed)
    )


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
