"""Streaming corpus reader: formats, documents, bad bytes, binary refusal."""

from __future__ import annotations

import base64
import builtins
import bz2
import gzip
import io
import json
import lzma
import random
import re
import sys
from pathlib import Path

import pytest
import zstandard

from bertforge import corpus
from bertforge.corpus import (
    CorpusStats,
    corpus_notes,
    corpus_warnings,
    iter_documents,
    iter_texts,
    require_text,
    resolve_inputs,
)
from bertforge.errors import UserError
from tests.conftest import write_arrow


def docs_of(paths, **kw) -> tuple[list[list[str]], CorpusStats]:
    stats = CorpusStats()
    docs = list(iter_documents(resolve_inputs([str(p) for p in paths]), stats, **kw))
    return docs, stats


def test_documents_split_on_blank_lines_and_files(tmp_path: Path):
    a = tmp_path / "a.txt"
    a.write_text("s1\ns2\n\n\n  \ns3\n")
    b = tmp_path / "b.txt"
    b.write_text("s4\n\ns5")
    docs, stats = docs_of([a, b])
    assert docs == [["s1", "s2"], ["s3"], ["s4"], ["s5"]]
    assert (stats.documents, stats.sentences, stats.files) == (4, 5, 2)
    # Google's script lets the last document of a file run on into the next file.
    docs, _ = docs_of([a, b], file_is_document_boundary=False)
    assert docs == [["s1", "s2"], ["s3", "s4"], ["s5"]]


WIKI = """<doc id="1" url="https://tr.wikipedia.org/wiki?curid=1" title="Nisan">
Nisan

Nisan yılın dördüncü ayıdır. Mart ile Mayıs arasındadır.
İkinci paragraf burada.
</doc>
<doc id="2" revid="5" url="https://tr.wikipedia.org/wiki?curid=2" title="Mayıs">
Mayıs

Mayıs beşinci aydır.
</doc>
"""


def test_wikiextractor_output_reads_as_its_articles(tmp_path: Path):
    """WikiExtractor's <doc> elements are documents: tag lines dropped, the blank line after
    the title ignored; Google's reading (doc_elements=False) keeps the tags as text."""
    wiki = tmp_path / "wiki_00"
    wiki.write_text(WIKI)
    docs, stats = docs_of([wiki])
    assert docs == [
        ["Nisan", "Nisan yılın dördüncü ayıdır. Mart ile Mayıs arasındadır.",
         "İkinci paragraf burada."],
        ["Mayıs", "Mayıs beşinci aydır."],
    ]  # fmt: skip
    assert (stats.documents, stats.sentences, stats.doc_elements) == (2, 5, 2)
    assert corpus_notes(stats.as_dict()) == [
        "read as WikiExtractor output: 2 <doc> elements, each one document (the tag lines "
        "dropped, blank lines inside an element ignored)"
    ]
    lines = WIKI.splitlines()
    docs, stats = docs_of([wiki], doc_elements=False)
    assert docs == [lines[0:2], lines[3:8], lines[9:11]] and stats.doc_elements == 0
    # text after an element, before the next, is a document of its own at the blank line
    wiki.write_text(WIKI + "stray line\n\n<doc>\nlast\n")
    docs, stats = docs_of([wiki])
    assert docs[2:] == [["stray line"], ["last"]] and stats.doc_elements == 3
    assert corpus_notes(CorpusStats().as_dict()) == []


ARTICLES = [
    {"id": "1", "title": "Nisan", "text": "Nisan yılın dördüncü ayıdır.\nİkinci satır.\n"},
    {"id": "2", "title": "Boş", "text": "  \n\n"},
    {"id": "3", "title": "Mayıs", "text": "Mayıs beşinci aydır.\r\n\n  Son satır.  "},
]


def test_json_lines_read_as_their_records(tmp_path: Path):
    """A file whose first line is a JSON object with the text field reads as JSON Lines
    (Hugging Face datasets, OSCAR, WikiExtractor --json): a record is one document, its text's
    lines its sentences, escapes decoded, and the same as the text file of the same
    documents. Files of each kind mix; compressed JSON Lines too; Google's reading
    (text_field None) keeps the JSON as text and counts the file."""
    plain = tmp_path / "plain.txt"
    plain.write_text("Bir.\nİki.\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(a) for a in ARTICLES) + "\n\n")  # ASCII: \u escapes
    assert "\\u0131" in jsonl.read_text()
    docs, stats = docs_of([plain, jsonl])
    assert docs == [
        ["Bir.", "İki."],
        ["Nisan yılın dördüncü ayıdır.", "İkinci satır."],
        ["Mayıs beşinci aydır.", "Son satır."],
    ]
    assert (stats.files, stats.json_files, stats.records, stats.records_without_text) == (
        2, 1, 3, 0)  # fmt: skip
    assert (stats.documents, stats.sentences) == (3, 6)
    assert corpus_notes(stats.as_dict()) == [
        'read as records: 3 from 1 JSON Lines file(s), the "text" field of each one document; '
        f"1 other file(s) read as text (the first: {plain})"
    ]
    assert corpus_warnings(stats.as_dict()) == []
    text = tmp_path / "same.txt"
    text.write_text("Bir.\nİki.\n\n" + "\n\n".join("\n".join(d) for d in docs[1:]) + "\n")
    assert docs_of([text])[0] == docs
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl.read_bytes()))
    assert docs_of([tmp_path / "c.jsonl.gz"])[0] == docs[1:]
    # another field, named
    jsonl.write_text("".join(json.dumps({"body": a["text"]}) + "\n" for a in ARTICLES))
    assert docs_of([jsonl], text_field="body")[0] == docs[1:]
    # Google's reading: the lines as text, and the file counted for a warning
    docs, stats = docs_of([jsonl], text_field=None, file_is_document_boundary=False)
    assert docs == [[json.dumps({"body": a["text"]}) for a in ARTICLES]]
    assert stats.json_as_text == 1 and stats.json_files == 0
    (warning,) = corpus_warnings(stats.as_dict())
    assert "1 file(s) are JSON Lines, read as text" in warning and "--google-compatible" in warning
    # a text file whose lines merely look like JSON, or start with "{", is text
    other = tmp_path / "braces.txt"
    other.write_text('{not json}\n[1, 2]\n{"a": 1}\n')
    assert docs_of([other])[0] == [["{not json}", "[1, 2]", '{"a": 1}']]
    other.write_text("[1] A footnote.\n[Chorus]\n")
    assert docs_of([other])[0] == [["[1] A footnote.", "[Chorus]"]]
    # one JSON array, on one line or pretty-printed, is an error (Google's reading: text)
    for text in (json.dumps(ARTICLES), json.dumps(ARTICLES, indent=2), '["a", "b"]'):
        other.write_text("\n" + text + "\n")
        with pytest.raises(UserError, match=rf"{other}:2: the file starts as one JSON array"):
            docs_of([other])
        assert docs_of([other], text_field=None)[0]


def test_json_lines_faults_name_the_line(tmp_path: Path):
    """A record without a string text field is left out and counted (first file:line named);
    a line that is not a JSON object is an error naming file:line; a first record without the
    field is an error listing the fields it has and naming --text-field; a lone surrogate
    escape is dropped and counted as invalid text, or with strict_utf8 an error."""
    f = tmp_path / "c.jsonl"
    f.write_text('\n{"text": "a"}\n{"text": null}\n{"id": 3}\n{"text": "x\\ud800y"}\n')
    docs, stats = docs_of([f])
    assert docs == [["a"], ["xy"]]
    assert (stats.records, stats.records_without_text, stats.first_without_text) == (4, 2, f"{f}:3")
    assert (stats.bad_lines, stats.first_bad) == (1, f"{f}:5")
    bad, skipped = corpus_warnings(stats.as_dict())
    assert f'2 record(s) had no string "text" field (read as empty); first at {f}:3' in skipped
    assert f"lone surrogate escapes (dropped); first at {f}:5" in bad
    with pytest.raises(UserError, match=rf"{f}:5: a lone surrogate escape .* --strict-utf8"):
        docs_of([f], strict_utf8=True)
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "cut\n')
    with pytest.raises(UserError, match=rf"{f}:3: not valid JSON \(Unterminated string.*Fix or"):
        docs_of([f])
    f.write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(UserError, match=rf"{f}:2: a JSON list, not an object"):
        docs_of([f])
    f.write_text('\n{"id": 1, "content": "a"}\n')
    with pytest.raises(
        UserError,
        match=rf'{f}:2: .* without a "text" field \(its fields: "id", "content"\); .*--text-field',
    ):
        docs_of([f])


def test_parquet_read_as_its_rows(tmp_path: Path, monkeypatch):
    """A Parquet file (as the Hugging Face Hub serves datasets) reads as one document per row
    of its text column, batch after batch and row group after row group, the same as the
    JSON Lines of those rows; a null is read as empty and counted (named by row); progress
    comes to the file's size; a column of pandas' categories reads as its strings. Errors
    name the file and say what to do: no such column (its columns listed), a column not of
    text, a file cut short, no pyarrow, and Google's reading (text only)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [a["text"] for a in ARTICLES] + [None, "Son.\nBitti."] * 3
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    f = tmp_path / "c.parquet"
    pq.write_table(table, f, row_group_size=4)
    assert pq.ParquetFile(f).num_row_groups == 3
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setattr(corpus, "TABLE_ROWS", 3)  # batches that cross row groups
    progress = corpus.Progress()
    stats = CorpusStats()
    docs = list(iter_documents(resolve_inputs([str(f)]), stats, progress=progress))
    assert docs == docs_of([jsonl])[0] and len(docs) == 5
    assert progress.done == f.stat().st_size
    assert (stats.files, stats.parquet_files, stats.records, stats.records_without_text) == (
        1, 1, len(texts), 3)  # fmt: skip
    assert stats.first_without_text == f"{f}: row 4"
    assert stats.bytes == sum(len(t.encode()) for t in texts if t)
    assert corpus_notes(stats.as_dict()) == [
        f'read as records: {len(texts)} from 1 Parquet file(s), the "text" field of each one '
        "document"
    ]
    assert list(iter_texts(resolve_inputs([str(f)]), CorpusStats()))[3:5] == ["", "Son. Bitti."]
    categories = tmp_path / "categories.parquet"  # pandas' categories, read back as such
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), categories)
    assert pa.types.is_dictionary(pq.read_schema(categories).field("text").type)
    assert docs_of([categories])[0] == docs
    both = CorpusStats()
    list(iter_documents(resolve_inputs([str(jsonl), str(f)]), both))
    assert "from 1 JSON Lines and 1 Parquet file(s)" in corpus_notes(both.as_dict())[0]
    with pytest.raises(UserError, match=r'without a "body" column \(its columns: "id", "text"\)'):
        docs_of([f], text_field="body")
    with pytest.raises(UserError, match='its "id" column holds int64, not text; name the column'):
        docs_of([f], text_field="id")
    with pytest.raises(UserError, match="a Parquet file, not a text corpus; Parquet is read by"):
        docs_of([f], text_field=None)  # Google's mode
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"{cut}: cannot read it as Parquet \(.*damaged or"):
        docs_of([cut])
    real_import = builtins.__import__

    def numpy_1(name, *args, **kw):  # pyarrow 20 or later beside NumPy 1
        if name.startswith("pyarrow"):
            raise ImportError("pyarrow requires NumPy 2.0 or newer, found 1.24.0")
        return real_import(name, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(builtins, "__import__", numpy_1)
        with pytest.raises(UserError, match=r"fails to import here: pyarrow requires NumPy 2"):
            docs_of([f])
    for name in ("pyarrow", "pyarrow.compute", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(UserError, match=r"a Parquet file; reading it needs pyarrow: pip install"):
        docs_of([f])


def test_parquet_reading_holds_a_batch_not_a_row_group(tmp_path: Path):
    """A row group can hold gigabytes of text; reading one holds about a page and a batch of
    rows in Arrow's memory, not its column chunk (pyarrow's default would take about the
    chunk's compressed size: here some 20 MB of incompressible text)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(0)
    texts = [base64.b64encode(rng.randbytes(1500)).decode() for _ in range(10_000)]
    f = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"text": texts}), f, row_group_size=len(texts))
    assert f.stat().st_size > 15e6
    peak = 0
    for _ in iter_documents(resolve_inputs([str(f)]), CorpusStats()):
        peak = max(peak, pa.total_allocated_bytes())
    assert 0 < peak < 10e6  # 7.2 MB with pyarrow 26 (its default: 26 MB)


def test_arrow_read_as_its_rows(tmp_path: Path, monkeypatch):
    """An Arrow stream (Hugging Face datasets' cache and save_to_disk) or Arrow file reads as
    one document per row of its text column, batch after batch, the same as the JSON Lines
    of those rows: its text as string, large_string or pandas' categories; a null is read as
    empty and counted (named by row); progress comes to the file's size. Errors name the file
    and say what to do: no such column (its columns listed), a column not of text, a file cut
    inside a batch or between two (pyarrow alone would read that as whole), no pyarrow, and
    Google's reading (text only)."""
    pa = pytest.importorskip("pyarrow")
    texts = [a["text"] for a in ARTICLES] + [None, "Son.\nBitti."] * 3
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = docs_of([jsonl])[0]
    monkeypatch.setattr(corpus, "TABLE_ROWS", 3)  # a batch read in parts
    columns = {
        "string": pa.array(texts),
        "large_string": pa.array(texts, pa.large_string()),
        "categories": pa.array(texts).dictionary_encode(),
    }
    for form in ("stream", "file"):
        for name, column in columns.items():
            f = tmp_path / f"{form}-{name}.arrow"
            write_arrow(f, pa.table({"id": range(len(texts)), "text": column}), 4, form)
            progress, stats = corpus.Progress(), CorpusStats()
            docs = list(iter_documents(resolve_inputs([str(f)]), stats, progress=progress))
            assert docs == expected, (form, name)
            assert progress.done == f.stat().st_size
            assert (stats.files, stats.arrow_files, stats.records) == (1, 1, len(texts))
            assert (stats.records_without_text, stats.first_without_text) == (3, f"{f}: row 4")
            assert stats.bytes == sum(len(t.encode()) for t in texts if t)
    assert corpus_notes(stats.as_dict()) == [
        f'read as records: {len(texts)} from 1 Arrow file(s), the "text" field of each one document'
    ]
    f = tmp_path / "stream-string.arrow"
    assert list(iter_texts(resolve_inputs([str(f)]), CorpusStats()))[3:5] == ["", "Son. Bitti."]
    with pytest.raises(UserError, match=r'an Arrow file without a "body" column \(its columns: '
                       r'"id", "text"\); name the column'):  # fmt: skip
        docs_of([f], text_field="body")
    with pytest.raises(UserError, match='its "id" column holds int64, not text; name the column'):
        docs_of([f], text_field="id")
    with pytest.raises(UserError, match="an Arrow file, not a text corpus; Arrow is read by its"):
        docs_of([f], text_field=None)  # Google's mode
    whole = f.read_bytes()
    batch_ends = [len(whole) - 8]  # a stream cut between two batches: find where one ends
    cut = tmp_path / "cut.arrow"
    for end in range(len(whole) - 9, 0, -1):
        cut.write_bytes(whole[:end])
        try:
            rows = sum(b.num_rows for b in pa.ipc.open_stream(pa.OSFile(str(cut))))
        except (OSError, pa.ArrowException):
            continue
        if 0 < rows < len(texts):  # pyarrow reads the cut file without a word
            batch_ends.append(end)
            break
    assert len(batch_ends) == 2
    for end in (*batch_ends, len(whole) - 20):
        cut.write_bytes(whole[:end])
        with pytest.raises(UserError, match=rf"{cut}: cannot read it as Arrow \(.*damaged or"):
            docs_of([cut])
    for name in ("pyarrow", "pyarrow.compute"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(UserError, match=r"an Arrow file; reading it needs pyarrow: pip install"):
        docs_of([f])


def test_invalid_utf8_in_a_table_is_dropped_and_counted_and_damage_is_an_error(tmp_path: Path):
    """Arrow does not check that a string column holds UTF-8: a row with invalid bytes (a tool
    wrote bytes into it, or the file is damaged) has them dropped and counted as a text
    file's line does, the row named (--strict-utf8: an error); offsets out of order are the
    error of a damaged file. Before, each raised a traceback (UnicodeDecodeError, and
    SystemError "Negative size passed to PyUnicode_New")."""
    import struct

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = pa.array([b"ok", b"bad\xff byte", None, b"fine"], pa.binary())
    table = pa.table({"text": pa.Array.from_buffers(pa.string(), 4, raw.buffers(), null_count=1)})
    arrow, parquet = tmp_path / "u.arrow", tmp_path / "u.parquet"
    write_arrow(arrow, table, 4)
    pq.write_table(table, parquet)
    for f in (arrow, parquet):
        docs, stats = docs_of([f])
        assert docs == [["ok"], ["bad byte"], ["fine"]]
        assert (stats.bad_lines, stats.first_bad) == (1, f"{f}: row 2")
        with pytest.raises(UserError, match=rf"{f}: row 2: invalid UTF-8 at byte 3 .*--strict"):
            docs_of([f], strict_utf8=True)
    write_arrow(arrow, pa.table({"text": ["abc", "defgh"]}), 2)
    whole = arrow.read_bytes()
    offsets = struct.pack("<3i", 0, 3, 8)
    assert whole.count(offsets) == 1
    arrow.write_bytes(whole.replace(offsets, struct.pack("<3i", 0, 7, 2)))
    with pytest.raises(UserError, match=rf"{arrow}: cannot read it as Arrow \(.*offset.*damaged"):
        docs_of([arrow])


def test_datasets_metadata_beside_arrow_files_left_out(tmp_path: Path):
    """A folder of Hugging Face datasets' save_to_disk (data-*.arrow, state.json,
    dataset_info.json; a dictionary's dataset_dict.json above its splits) reads as its rows
    alone, given as the folder or by a glob; the same file names elsewhere, or named
    themselves, are read. A datasets cache folder's map() results (cache-*.arrow) are read
    with a warning: they often hold the text again."""
    pa = pytest.importorskip("pyarrow")
    saved = tmp_path / "saved"
    for split in ("train", "test"):
        (saved / split).mkdir(parents=True)
        write_arrow(saved / split / "data-00000-of-00001.arrow", pa.table({"text": [split]}), 1)
        (saved / split / "state.json").write_text('{\n  "_split": "train"\n}\n')
        (saved / split / "dataset_info.json").write_text('{"builder_name": "json"}\n')
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    assert docs_of([saved])[0] == [["test"], ["train"]]
    assert docs_of([f"{saved}/**"])[0] == [["test"], ["train"]]
    assert docs_of([saved / "train"])[0] == [["train"]]
    assert docs_of([saved / "train" / "state.json"])[0] == [["{", '"_split": "train"', "}"]]
    other = tmp_path / "other"
    other.mkdir()
    (other / "state.json").write_text("a sentence\n")
    assert docs_of([other])[0] == [["a sentence"]]
    cache = tmp_path / "cache"  # a datasets cache: the split's file and a map()'s result
    cache.mkdir()
    write_arrow(cache / "json-train.arrow", pa.table({"text": ["t"]}), 1)
    write_arrow(cache / "cache-0123456789abcdef.arrow", pa.table({"text": ["t"]}), 1)
    (cache / "dataset_info.json").write_text('{"builder_name": "json"}\n')
    docs, stats = docs_of([cache])
    assert docs == [["t"], ["t"]]
    (warning,) = corpus_warnings(stats.as_dict())
    assert warning.startswith("warning: 1 Arrow file(s) are Hugging Face datasets' map() results")
    assert str(cache / "cache-0123456789abcdef.arrow") in warning
    assert corpus_warnings(docs_of([cache / "json-train.arrow"])[1].as_dict()) == []


def test_texts_are_one_per_line_or_record(tmp_path: Path):
    """`bertforge embed`'s reading: a text per line (blank ones too: one row per line), and per
    JSON Lines record its lines joined ("" for a record without text: one row per record)."""
    plain = tmp_path / "a.txt"
    plain.write_text("x y\n\nz\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "p\\nq"}\n\n{"text": 5}\n{"text": "r"}\n')
    stats = CorpusStats()
    texts = list(iter_texts(resolve_inputs([str(plain), str(jsonl)]), stats))
    assert texts == ["x y", "", "z", "p q", "", "r"]
    assert (stats.records, stats.records_without_text) == (3, 1)


def test_compressed_inputs_detected_by_magic(tmp_path: Path):
    text = b"one\ntwo\n\nthree\n"
    (tmp_path / "x.gz").write_bytes(gzip.compress(text))
    (tmp_path / "y.bz2").write_bytes(bz2.compress(text))
    (tmp_path / "z.xz").write_bytes(lzma.compress(text))
    (tmp_path / "noext").write_bytes(gzip.compress(text))
    zstd = zstandard.ZstdCompressor()  # two frames, as `cat a.zst b.zst` makes
    (tmp_path / "w.zst").write_bytes(zstd.compress(text[:5]) + zstd.compress(text[5:]))
    for name in ["x.gz", "y.bz2", "z.xz", "noext", "w.zst"]:
        docs, _ = docs_of([tmp_path / name])
        assert docs == [["one", "two"], ["three"]], name


def test_compressed_inputs_cut_short_are_errors(tmp_path: Path):
    """A compressed file cut short (a download stopped) is an error naming it, never the text
    it has so far: gzip and xz say so themselves; zstandard's stream reader would return the
    part silently, so ZstdReader checks that the last frame ended."""
    text = "".join(f"line {i} of a corpus\n" for i in range(20_000)).encode()
    compressors = {"gzip": gzip.compress, "xz": lzma.compress,
                   "zstd": zstandard.ZstdCompressor().compress}  # fmt: skip
    for kind, compress in compressors.items():
        whole = compress(text)
        f = tmp_path / f"c.{kind}"
        f.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(UserError, match=rf"{f}: (read error|damaged {kind} file) \("):
            docs_of([f])
        f.write_bytes(whole)
        assert sum(map(len, docs_of([f])[0])) == 20_000


def test_directories_globs_sorted(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b\n")
    (tmp_path / "d" / "sub" / "a.txt").write_text("a\n")
    (tmp_path / "d" / ".hidden").write_text("h\n")
    docs, _ = docs_of([tmp_path / "d"])
    assert docs == [["b"], ["a"]]  # sorted by path: d/b.txt < d/sub/a.txt
    stats = CorpusStats()
    found = resolve_inputs([str(tmp_path / "d" / "**" / "*.txt")])
    assert [Path(f.path).name for f in found] == ["b.txt", "a.txt"]
    assert list(iter_documents(found, stats)) == [["b"], ["a"]]
    # hidden directories and bertforge's outputs are not read: a stage at work (its lock), a
    # finished stage (its manifest), a `bertforge run` directory (its run.json of stages)
    d = tmp_path / "d"
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    for sub, name, text in [
        ("work", ".bertforge.lock", ""), ("vocab", "manifest.json", '{"stage": "vocab"}'),
        ("run", "run.json", '{"vocab": {"config": {}, "done": true}}'),
    ]:  # fmt: skip
        (d / sub / "x").mkdir(parents=True)
        (d / sub / name).write_text(text)
        (d / sub / "x" / "vocab.txt").write_text("[PAD]\n")
    (d / "notes").mkdir()  # a manifest.json or run.json of something else is text
    (d / "notes" / "manifest.json").write_text('{"name": "notes", "text": "n"}')
    (d / "notes" / "run.json").write_text("steps: 3")
    docs, _ = docs_of([d])
    assert docs == [["b"], ["n"], ["steps: 3"], ["a"]]
    found = resolve_inputs([str(d / "**" / "*.txt")])
    assert [Path(f.path).name for f in found] == ["b.txt", "a.txt"]
    docs, _ = docs_of([d / "work"])  # named itself, it is read (a lock stays after its stage)
    assert docs == [["[PAD]"]]
    run_dir = "a `bertforge run` directory"
    for sub, what in (("vocab", "a `bertforge vocab` output"), ("run", run_dir)):
        with pytest.raises(UserError, match=re.escape(f"{d / sub} is {what}, not a corpus")):
            resolve_inputs([str(d / sub)])  # named itself: refused, as its files are no text
    docs, _ = docs_of([d / "notes"])  # another tool's manifest.json and run.json: text
    assert docs == [["n"], ["steps: 3"]]
    named = resolve_inputs([str(d / "vocab" / "*" / "*.txt")])  # so is a glob in it
    assert [Path(f.path).name for f in named] == ["vocab.txt"]


def test_a_file_named_twice_is_an_error(tmp_path: Path):
    """Read twice, a file's text would be in the data twice: a pattern given twice, a file
    inside a directory also given, overlapping globs, and a link to a file beside it are
    errors naming both; distinct files under several patterns are not."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt"):
        (d / name).write_text("x\n")
    a, b = str(d / "a.txt"), str(d / "sub" / "b.txt")
    with pytest.raises(UserError, match=rf"--input: {a} is given twice; give it once"):
        resolve_inputs([a, a])
    with pytest.raises(UserError, match="- is given twice"):
        resolve_inputs(["-", "-"])
    with pytest.raises(UserError, match=rf"{b} is read by both {d} and {b}, so its text"):
        resolve_inputs([str(d), b])
    stars, deep = str(d / "*" / "*.txt"), str(d / "**" / "*.txt")
    with pytest.raises(UserError, match=rf"--input: {b} is read by both .*\*\.txt and "):
        resolve_inputs([stars, deep])
    assert [f.path for f in resolve_inputs([a, str(d / "sub")])] == [a, b]
    (d / "sub" / "c.txt").symlink_to(d / "a.txt")
    with pytest.raises(UserError, match=r"--corpus: .*a\.txt and .*c\.txt are the same file"):
        resolve_inputs([str(d)], "--corpus")


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\ny\n\nz\n")))
    stats = CorpusStats()
    assert list(iter_documents(resolve_inputs(["-"]), stats)) == [["x", "y"], ["z"]]


def feed_fifo(path: Path, data: bytes) -> None:
    """A named pipe at `path` that a thread fills with `data` once a reader opens it."""
    import os
    import threading

    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)

    threading.Thread(target=write, daemon=True).start()


def test_pipes_are_read_as_they_come(tmp_path: Path):
    """A pipe (`<(zcat a.gz)` is /dev/fd/63; a named FIFO) is read once, as stdin is: no size,
    its compression told by peeking at its first bytes. Before, it was "does not exist"."""
    fifo = tmp_path / "corpus.fifo"
    feed_fifo(fifo, gzip.compress(b"x\ny\n\nz\n"))
    (inp,) = resolve_inputs([str(fifo)])
    assert inp.size is None and corpus.total_size([inp]) is None
    assert corpus.table_kind(inp.path) is None  # would have read its first bytes apart
    assert list(iter_documents([inp], CorpusStats())) == [["x", "y"], ["z"]]
    assert not corpus.is_stream(str(tmp_path)) and corpus.is_stream("-")


def test_inputs_diff_names_the_first_file_that_changed():
    a, b = {"path": "a.txt", "bytes": 10}, {"path": "b.txt", "bytes": 20}
    assert corpus.inputs_diff([a], [a, b]) == "b.txt is new"
    assert corpus.inputs_diff([a, b], [a]) == "b.txt is no longer read"
    assert corpus.inputs_diff([a], [{**a, "bytes": 1234}]) == "a.txt had 10 bytes, now 1,234"
    assert corpus.inputs_diff([a, b], [b, a]) == "their order"


def test_missing_input_is_named(tmp_path: Path):
    with pytest.raises(UserError, match=r"--input: .*nope\.txt does not exist"):
        resolve_inputs([str(tmp_path / "nope.txt")])


def test_invalid_utf8_dropped_and_counted(tmp_path: Path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good\nba\xffd\n\xc3\nok\xe4\xb8\n")
    docs, stats = docs_of([f])
    # A line of nothing but bad bytes decodes to "" and so ends a document, as in Google's.
    assert docs == [["good", "bad"], ["ok"]]
    assert stats.bad_lines == 3 and stats.first_bad == f"{f}:2"
    assert "3 line(s) had invalid UTF-8" in corpus_warnings(stats.as_dict())[0]


def test_text_in_a_single_byte_encoding_says_to_convert_it(tmp_path: Path):
    """Latin-1, ISO-8859-9 and Windows-1251 text is refused as such, not as "binary", naming
    a word and iconv; sparser accents pass the first bytes, and the warning of their many
    dropped bytes says the same."""
    samples = {
        "latin1": ("på være også søster få år gå nå blå grønn\n" * 300, "'på'"),
        "iso-8859-9": ("Türkçe metin: İstanbul, ağaç, şeker, ıspanak.\n" * 300, "'Türkçe'"),
        "cp1251": ("Привет мир, как дела?\n" * 300, "'Ïðèâåò'"),
    }
    for encoding, (text, word) in samples.items():
        f = tmp_path / f"{encoding}.txt"
        f.write_bytes(text.encode(encoding))
        with pytest.raises(UserError, match="not UTF-8 but text in a single-byte encoding") as e:
            docs_of([f])
        assert f"read as Windows-1252: {word});" in str(e.value) and "iconv -f" in str(e.value)
    noise = tmp_path / "noise.txt"  # control bytes: not text in any encoding
    noise.write_bytes(bytes(range(1, 256)) * 40)
    with pytest.raises(UserError, match="looks binary"):
        docs_of([noise])
    sparse = tmp_path / "sparse.txt"  # one accent in 20 lines: read, the accents dropped
    sparse.write_bytes("".join(f"line {i}" + (" café\n" if i % 20 == 0 else "\n")
                               for i in range(2000)).encode("latin1"))  # fmt: skip
    (warning,) = corpus_warnings(docs_of([sparse])[1].as_dict())
    assert "100 line(s) had invalid UTF-8" in warning and "single-byte encoding" in warning
    few = tmp_path / "few.txt"
    few.write_bytes(b"ok\n" * 2000 + b"caf\xe9\n" * 10)  # 10 in 2,010 lines: a few bad bytes
    (warning,) = corpus_warnings(docs_of([few])[1].as_dict())
    assert "10 line(s) had invalid UTF-8" in warning and "single-byte" not in warning


def test_strict_utf8_names_file_line_and_offset(tmp_path: Path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good\nba\xffd\n")
    with pytest.raises(UserError, match=r"bad\.txt:2: invalid UTF-8 at byte 7 of the file"):
        docs_of([f], strict_utf8=True)


def test_bom_crlf_and_cr(tmp_path: Path):
    f = tmp_path / "win.txt"
    f.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\r\n\r\nthird\rstill third\n")
    docs, _ = docs_of([f])
    assert docs == [["first", "second"], ["third\rstill third"]]
    mac = tmp_path / "mac.txt"
    mac.write_bytes(b"one\rtwo\r\rthree\r")
    docs, _ = docs_of([mac])
    assert docs == [["one", "two"], ["three"]]


def test_control_characters_are_kept_for_the_tokenizer(tmp_path: Path):
    f = tmp_path / "ctl.txt"
    f.write_bytes(b"a\x00b\x07c\n")
    docs, _ = docs_of([f])
    assert docs == [["a\x00b\x07c"]]


def test_every_file_read_is_closed_plain_compressed_or_refused(tmp_path: Path, monkeypatch):
    """Closing a stream closed its wrapper, not the file under it (gzip's, bz2's, lzma's and
    bertforge's own readers leave a file object they were given open): a file descriptor
    per input and pass until garbage collection, and a ResourceWarning under -X dev."""
    opened = []

    def tracking_open(*args, **kwargs):
        f = builtins.open(*args, **kwargs)  # noqa: SIM115 - the code under test closes it
        opened.append(f)
        return f

    monkeypatch.setattr(corpus, "open", tracking_open, raising=False)
    text = b"one line\ntwo lines\n\nthree\n"
    files = {"plain.txt": text, "gz.txt.gz": gzip.compress(text), "bz.txt.bz2": bz2.compress(text),
             "xz.txt.xz": lzma.compress(text), "zst.txt.zst": zstandard.compress(text)}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    docs, _ = docs_of([tmp_path / name for name in files])
    assert len(docs) == 2 * len(files) and len(opened) >= len(files)
    before = len(opened)
    (tmp_path / "png.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(text)[:12])  # damaged: refused
    for name in ("png.txt", "bad.gz"):
        with pytest.raises(UserError):
            docs_of([tmp_path / name])
    assert len(opened) > before and all(f.closed for f in opened)


@pytest.mark.parametrize(
    "head,kind",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "a PNG image, .*; leave it out of the corpus \\(move"),
        (b"PK\x03\x04" + bytes(100), "a zip archive, not a text corpus; unpack it"),
        (b"\xff\xfeh\x00i\x00", "UTF-16 text, not a text corpus; convert it to UTF-8"),
        (bytes(range(256)) * 8, "looks binary .*; leave it out of the corpus"),
        (gzip.compress(b"\xff\xff\xff\xffp" + bytes(100), mtime=0), "an Arrow file, .*by its"),
        (b"\x28\xb5\x2f\xfd" + bytes(100), "damaged zstd file"),  # not zstd after all
        (gzip.compress(b"PAR1" + bytes(100), mtime=0), "a Parquet file, .*by its path"),
    ],
    # named, not by their bytes: a name must be the same in every pytest-xdist worker (gzip's
    # header holds the time, which made two workers collect two names for one test)
    ids=["png", "zip", "utf16", "noise", "arrow-gz", "zstd", "parquet-gz"],
)
def test_binary_files_refused(tmp_path: Path, head: bytes, kind: str):
    f = tmp_path / "file.txt"
    f.write_bytes(head)
    with pytest.raises(UserError, match=kind):
        docs_of([f])


def test_empty_input_is_an_error(tmp_path: Path):
    f = tmp_path / "empty.txt"
    f.write_text("\n \n\n")
    _, stats = docs_of([f])
    with pytest.raises(UserError, match="contains no text"):
        require_text(stats, [str(f)])


def test_one_megabyte_line(tmp_path: Path):
    f = tmp_path / "long.txt"
    f.write_bytes(b"word " * 400_000 + b"\nnext\n")
    docs, stats = docs_of([f])
    assert len(docs[0][0]) == 5 * 400_000 - 1 and docs[0][1] == "next"
    assert stats.bytes == f.stat().st_size
