"""Streaming corpus reader: formats, documents, bad bytes, binary refusal."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import sys
from pathlib import Path

import pytest

from bertforge.corpus import (
    CorpusStats,
    iter_documents,
    markup_note,
    require_text,
    resolve_inputs,
)
from bertforge.errors import UserError


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
    assert markup_note(stats.doc_elements) == (
        "read as WikiExtractor output: 2 <doc> elements, each one document (the tag lines "
        "dropped, blank lines inside an element ignored)"
    )
    lines = WIKI.splitlines()
    docs, stats = docs_of([wiki], doc_elements=False)
    assert docs == [lines[0:2], lines[3:8], lines[9:11]] and stats.doc_elements == 0
    # text after an element, before the next, is a document of its own at the blank line
    wiki.write_text(WIKI + "stray line\n\n<doc>\nlast\n")
    docs, stats = docs_of([wiki])
    assert docs[2:] == [["stray line"], ["last"]] and stats.doc_elements == 3
    assert markup_note(CorpusStats().doc_elements) is None


def test_compressed_inputs_detected_by_magic(tmp_path: Path):
    text = b"one\ntwo\n\nthree\n"
    (tmp_path / "x.gz").write_bytes(gzip.compress(text))
    (tmp_path / "y.bz2").write_bytes(bz2.compress(text))
    (tmp_path / "z.xz").write_bytes(lzma.compress(text))
    (tmp_path / "noext").write_bytes(gzip.compress(text))
    for name in ["x.gz", "y.bz2", "z.xz", "noext"]:
        docs, _ = docs_of([tmp_path / name])
        assert docs == [["one", "two"], ["three"]], name


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
    (d / "notes" / "manifest.json").write_text('{"name": "notes"}')
    (d / "notes" / "run.json").write_text('{"steps": 3}')
    docs, _ = docs_of([d])
    assert docs == [["b"], ['{"name": "notes"}'], ['{"steps": 3}'], ["a"]]
    found = resolve_inputs([str(d / "**" / "*.txt")])
    assert [Path(f.path).name for f in found] == ["b.txt", "a.txt"]
    docs, _ = docs_of([d / "work"])  # named itself, it is read
    assert docs == [["[PAD]"]]
    named = resolve_inputs([str(d / "vocab" / "*" / "*.txt")])  # so is a glob in it
    assert [Path(f.path).name for f in named] == ["vocab.txt"]


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\ny\n\nz\n")))
    stats = CorpusStats()
    assert list(iter_documents(resolve_inputs(["-"]), stats)) == [["x", "y"], ["z"]]


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
    assert "3 line(s) had invalid UTF-8" in stats.report()


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


@pytest.mark.parametrize(
    "head,kind",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "a PNG image"),
        (b"PK\x03\x04" + bytes(100), "a zip archive"),
        (b"\xff\xfeh\x00i\x00", "UTF-16 text"),
        (bytes(range(256)) * 8, "looks binary"),
    ],
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
