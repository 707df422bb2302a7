"""Streaming corpus reader for Google's format, used by every stage.

Google's format is one sentence per line and a blank line between documents. Inputs are
files, globs, directories (recursively, sorted), gzip/bzip2/xz/zstd files (detected by their
magic bytes, whatever their name), `-` for stdin and pipes (`<(zcat a.gz b.gz)`, a named
FIFO), in any mix. Nothing is read whole into
memory: lines stream from a buffered binary reader, so memory stays flat and a 1 MB line
costs linear time. JSON Lines and Parquet files (the forms corpora are downloaded in today)
read as one document per record (`iter_items`).

Why a reader of our own: the stages need Google's exact reading (its document boundaries,
its dropping of bad bytes) with file:line in every error; the parsing itself is the
standard library's (json, gzip, bz2, lzma), zstandard's and pyarrow's.

Decoding follows Google's `convert_to_unicode(..., errors="ignore")`: invalid UTF-8 bytes are
dropped (replaced by nothing), which is what makes our data record-identical to Google's; we
also count the lines that had them and report the first file:line. `strict_utf8` makes the
first bad byte an error naming file:line and byte offset. A UTF-8 BOM is stripped; CRLF ends a
line; a lone CR inside a line is whitespace (as in Google's tokenizer), and a file that uses
only CR as its line break (classic Mac) is read as CR-separated lines. NUL and other control
characters are left for the tokenizer to clean, exactly as Google's tokenizer does. Files
that are binary (images, archives, UTF-16 text) are refused.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bertforge.errors import UserError
from bertforge.fileio import RUN_STATE, is_output_dir, output_stages, sha256_file

STDIN = "-"
DOC_START = re.compile(r'<doc( [a-z_]+="[^"]*")*>')  # WikiExtractor's, e.g. <doc id="1" ...>
SNIFF_BYTES = 8192
PARQUET_MAGIC = b"PAR1"
PARQUET_BUFFER = 1 << 20  # bytes of a column chunk read at a time
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # a message's continuation marker: UTF-8 has no 0xff
ARROW_STREAM_END = ARROW_STREAM_MAGIC + bytes(4)
RECORD_FILES = [("JSON Lines", "json"), ("Parquet", "parquet"), ("Arrow", "arrow")]
DATASETS_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json"}
DATASETS_CACHE = re.compile(r"cache-[0-9a-f]{16}(_\d{5}_of_\d{5})?\.arrow")  # a map()'s result
TABLE_ROWS = 1024  # rows of a Parquet or Arrow file read at a time
TEXT_FIELD = "text"  # the text of a JSON Lines record: Hugging Face datasets, OSCAR, WikiExtractor
SURROGATE = re.compile("[\ud800-\udfff]")  # left by a lone "\\ud800" escape in JSON

# Magic numbers of formats that are certainly not a text corpus.
BINARY_MAGIC: list[tuple[bytes, str]] = [
    (b"PK\x03\x04", "a zip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
    (b"7z\xbc\xaf", "a 7z archive"),
    (PARQUET_MAGIC, "a Parquet file"),
    (ARROW_FILE_MAGIC, "an Arrow file"),
    (ARROW_STREAM_MAGIC, "an Arrow file"),  # Hugging Face datasets' cache and save_to_disk
    (b"RIFF", "a RIFF (audio/video/image) file"),
    (b"SQLite format 3", "an SQLite database"),
    (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"),
]
CORPUS_FORMATS = (
    "bertforge reads UTF-8 text and JSON Lines, plain or compressed with gzip, bzip2, xz or "
    "zstd, and Parquet and Arrow files"
)
BY_PATH = (
    "{} is read by its path, uncompressed, and not under --google-compatible (Google's "
    "script reads text only)"
)
# What to do about a file that is no corpus: in a corpus directory every file is read.
LEAVE_OUT = (
    CORPUS_FORMATS + "; leave it out of the corpus (move it out of the directory, or give the "
    "corpus files by name or glob)"
)
BINARY_HINTS = {
    "UTF-16 text": "convert it to UTF-8 (iconv -f UTF-16)",
    "a zip archive": "unpack it and pass the directory",
    "a 7z archive": "unpack it and pass the directory",
    "a Parquet file": BY_PATH.format("Parquet"),
    "an Arrow file": BY_PATH.format("Arrow"),
}
COMPRESSED_MAGIC: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
]


DECOMPRESSORS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f),  # type: ignore[return-value]
    "bzip2": lambda f: bz2.BZ2File(f),  # type: ignore[return-value]
    "xz": lambda f: lzma.LZMAFile(f),  # type: ignore[return-value]  # noqa: SIM115
    "zstd": lambda f: ZstdReader(f),  # type: ignore[return-value]
}


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd file: its frames one after another, as `zstd -d` reads
    them (OSCAR ships .jsonl.zst). zstandard's own stream_reader returns what it has of a
    file cut short, silently; here, as gzip's and xz's readers do, a file that ends inside a
    frame is an EOFError, and damage an OSError."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self.raw, self.zstd = raw, zstandard
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.started = False  # has the current frame had any input
        self.out, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        while self.pos == len(self.out):
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame (cut short?)")
                return 0
            self.out, self.pos = self._decompress(chunk), 0
        n = min(len(b), len(self.out) - self.pos)
        b[:n] = self.out[self.pos : self.pos + n]
        self.pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        try:
            while chunk:
                if self.frame.eof:  # the next frame starts in what the last one left
                    self.frame = self.zstd.ZstdDecompressor().decompressobj()
                self.started = True
                out.append(self.frame.decompress(chunk))
                chunk = self.frame.unused_data if self.frame.eof else b""
        except self.zstd.ZstdError as e:
            raise OSError(f"zstd: {e}") from None
        return b"".join(out)


@dataclass
class InputFile:
    """One resolved input: a path (or '-') and its size on disk (None for stdin or a pipe,
    which can be read only once: `is_stream`)."""

    path: str
    size: int | None

    def describe(self) -> dict:
        return {"path": self.path, "bytes": self.size}


@dataclass
class CorpusStats:
    """What reading a corpus saw; filled in while streaming."""

    files: int = 0
    bytes: int = 0  # decoded-stream bytes (after decompression)
    lines: int = 0
    sentences: int = 0  # non-blank lines
    documents: int = 0  # non-empty documents
    bad_lines: int = 0  # lines that had invalid UTF-8 (bytes dropped)
    first_bad: str | None = None  # "file:line" of the first one
    doc_elements: int = 0  # WikiExtractor's <doc ...> lines read as document starts
    json_files: int = 0  # files read as JSON Lines
    parquet_files: int = 0  # files read as Parquet
    arrow_files: int = 0  # files read as Arrow (Hugging Face datasets' own)
    record_field: str | None = None  # the field (column) their text was read from
    records: int = 0  # their records (rows)
    records_without_text: int = 0  # records whose field was missing or not a string
    first_without_text: str | None = None  # "file:line" (or "file: row N") of the first one
    json_as_text: int = 0  # JSON Lines files read as text (Google's mode)
    arrow_caches: int = 0  # Arrow files named as datasets names a map()'s result: cache-*.arrow
    first_arrow_cache: str | None = None
    text_files: int = 0  # files read as text
    first_text_file: str | None = None

    def bad_line(self, where: str) -> None:
        """Count a line (or record) whose invalid text was dropped; `where` is "file:line"."""
        self.bad_lines += 1
        self.first_bad = self.first_bad or where

    def as_dict(self) -> dict:
        """Every field, as manifests keep them (two under the names they have always had)."""
        d = asdict(self)
        d["bad_utf8_lines"], d["first_bad_utf8_line"] = d.pop("bad_lines"), d.pop("first_bad")
        return d


@dataclass
class Progress:
    """Bytes of input consumed so far (compressed bytes for compressed files)."""

    done: int = 0
    callbacks: list[Callable[[int], None]] = field(default_factory=list)

    def advance(self, n: int) -> None:
        self.done += n
        for cb in self.callbacks:
            cb(n)


def resolve_inputs(patterns: Sequence[str], flag: str = "--input") -> list[InputFile]:
    """Expand files, globs and directories (recursively, sorted) into a list of files. A file
    that two patterns name (`corpus/*.txt corpus/a.txt`, a directory and a file in it) is an
    error: read twice, its text would be in the data twice."""
    out: list[InputFile] = []
    named: dict[str, tuple[str, str]] = {}  # real path -> (pattern, path) that named it first
    given: set[str] = set()
    for pattern in patterns:
        if pattern in given:
            raise UserError(f"{flag}: {pattern} is given twice; give it once.")
        given.add(pattern)
        if pattern == STDIN:
            out.append(InputFile(STDIN, None))
            continue
        p = Path(pattern)
        if p.is_dir():
            if what := output_named(p):
                raise UserError(
                    f"{flag}: {pattern} is {what}, not a corpus (its files would be read as "
                    "text); give the corpus's files or the directory that holds them."
                )
            found = without_datasets_metadata(corpus_files_under(p))
            if not found:
                raise UserError(f"{flag}: directory {pattern} contains no files.")
        elif p.is_file():
            found = [pattern]
        elif is_stream(pattern):
            out.append(InputFile(pattern, None))
            continue
        else:
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            found = without_datasets_metadata(outside_outputs(found, glob_root(pattern)))
            if not found:
                raise UserError(f"{flag}: {pattern} does not exist (no file matches).")
        for f in found:
            by, first = named.setdefault(os.path.realpath(f), (pattern, f))
            if by != pattern:
                raise UserError(
                    f"{flag}: {f} is read by both {by} and {pattern}, so its text would be in "
                    "the data twice; name each file once."
                )
            if first != f:
                raise UserError(
                    f"{flag}: {first} and {f} are the same file (a link), both under {pattern}, "
                    "so its text would be in the data twice; leave one out."
                )
            out.append(InputFile(f, os.path.getsize(f)))
    return out


def output_named(directory: Path) -> str | None:
    """What a directory given as the corpus is, where bertforge wrote it: a stage's output (by
    its manifest.json, or its unfinished run's file) or a `bertforge run` directory (by its
    run.json); None otherwise. A lock file alone is read past: it stays after its stage."""
    names = os.listdir(directory)
    if stages := sorted(output_stages(directory, names)):
        return f"a `bertforge {stages[0]}` output"
    if RUN_STATE in names and is_output_dir(directory, [RUN_STATE]):
        return "a `bertforge run` directory"
    return None


def check_output_apart(output: str, patterns: Sequence[str]) -> None:
    """Refuse an output directory that is a directory the corpus is read from (one given, or
    a glob's root): the stage's files would land among the corpus's and be read as corpus by
    the next run over it (`corpus_files_under` leaves out outputs below a corpus directory,
    not the directory itself). `vocab corpus/ --output corpus/ --overwrite` did that."""
    out = Path(output).resolve()
    for pattern in patterns:
        if pattern == STDIN:  # a pipe is neither a directory nor a glob: no root
            continue
        p = Path(pattern)
        root = p if p.is_dir() else glob_root(pattern) if glob.has_magic(pattern) else None
        if root is not None and root.resolve() == out:
            raise UserError(
                f"--output: {output} is the directory the corpus is read from ({pattern}); its "
                "files would be read as corpus by the next run over it. Give another directory."
            )


def corpus_files_under(directory: Path) -> list[str]:
    """The files under a directory, recursively, sorted by path. Hidden files and directories
    are left out, and so is any bertforge output inside it (`fileio.is_output_dir`):
    `bertforge run corpus/ --output corpus/work` must not read its own vocabulary, manifests
    and shards as corpus."""
    found = []
    for root, dirs, files in os.walk(directory):
        if Path(root) != directory and is_output_dir(Path(root), files):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(f for f in found if os.path.isfile(f))


def without_datasets_metadata(files: list[str]) -> list[str]:
    """The files less Hugging Face datasets' metadata: `save_to_disk` writes state.json and
    dataset_info.json beside a dataset's .arrow files (and its cache, dataset_info.json), and
    a dataset dictionary's dataset_dict.json above its splits. Read as corpus, their JSON would
    be text, or a record without a text field. Left out where they are datasets' (a .arrow
    file or dataset_dict.json beside them), of a directory or glob; a file named is read."""
    holds: dict[str, bool] = {}

    def is_dataset_dir(directory: str) -> bool:
        if directory not in holds:
            names = os.listdir(directory or ".")
            holds[directory] = "dataset_dict.json" in names or any(
                name.endswith(".arrow") for name in names
            )
        return holds[directory]

    return [
        f
        for f in files
        if os.path.basename(f) not in DATASETS_METADATA or not is_dataset_dir(os.path.dirname(f))
    ]


def glob_root(pattern: str) -> Path:
    """The part of a glob pattern before its first wildcard, as a directory."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return Path(*fixed) if fixed else Path()


def outside_outputs(files: list[str], top: Path) -> list[str]:
    """The files with no bertforge output directory between `top` (excluded) and them: a
    glob such as corpus/**/*.txt must not pick up an output's vocab.txt either. Each
    directory is looked at once, however many files it holds."""
    top = top.resolve()
    output: dict[Path, bool] = {}

    def below_output(directory: Path) -> bool:
        if directory == top or top not in directory.parents:
            return False
        if directory not in output:
            output[directory] = is_output_dir(directory, os.listdir(directory)) or (
                below_output(directory.parent)
            )
        return output[directory]

    return [f for f in files if not below_output(Path(f).resolve().parent)]


def is_stream(path: str) -> bool:
    """Whether an input is read as it comes, once, with no size: stdin, or a path that is a
    pipe or a character device (`<(zcat a.gz)` is /dev/fd/63; /dev/stdin). Its first bytes
    are peeked at, never read apart (`table_kind` opens other files twice)."""
    if path == STDIN:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def inputs_diff(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """The first input file that was added, removed or changed size (`InputFile.describe` lists),
    as a user can check it."""
    was = {i["path"]: i["bytes"] for i in old}
    now = {i["path"]: i["bytes"] for i in new}
    for path, size in now.items():
        if path not in was:
            return f"{path} is new"
        if was[path] != size:
            return f"{path} had {was[path]:,} bytes, now {size:,}"
    gone = [path for path in was if path not in now]
    return f"{gone[0]} is no longer read" if gone else "their order"


def stamped(inputs: Sequence[InputFile]) -> list[dict[str, Any]]:
    """The files as `InputFile.describe` lists them, with their modification times: what
    tells an edit that kept the size (`tr A-Z a-z`), which their sha256 then confirms or
    not (`corpus_change`)."""
    files = [f.describe() for f in inputs]
    return [f if f["bytes"] is None else {**f, "mtime_ns": os.stat(f["path"]).st_mtime_ns}
            for f in files]  # fmt: skip


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, bytes, mtime_ns) -> sha256


def digest(f: dict[str, Any]) -> str:
    """The sha256 of a `stamped` corpus file, read once per process while its size and time
    stay the same (run's vocab and data stages, and the data stage's manifest, read the same
    files)."""
    key = (f["path"], f["bytes"], f["mtime_ns"])
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(f["path"])
    return _DIGESTS[key]


def with_digests(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`stamped` files' entries with their sha256, as a record of what was read keeps them."""
    return [{**f, "sha256": digest(f)} if "mtime_ns" in f else f for f in files]


def restamped(was: list[dict[str, Any]] | None, now: list[dict[str, Any]]) -> bool:
    """Whether a kept stage's record of its corpus files wants the times (and sha256) of
    `now`: files found the same after a copy or a touch, or a record of an older bertforge."""
    return was is None or any(
        "sha256" not in old or old.get("mtime_ns") != new["mtime_ns"]
        for old, new in zip(was, now, strict=True)
        if "mtime_ns" in new
    )


def corpus_change(was: list[dict[str, Any]], now: list[dict[str, Any]]) -> str | None:
    """How the corpus files `now` differ from those a stage last ran on, or None: a file added,
    gone or of another size, or of the same size, modified since, with other content (its
    sha256). A file touched or copied (a moved run) but the same is the same. Records of an
    older bertforge have names and sizes only, and are compared by them."""
    if [(f["path"], f["bytes"]) for f in was] != [(f["path"], f["bytes"]) for f in now]:
        return inputs_diff(was, now)
    for old, new in zip(was, now, strict=True):
        if "sha256" not in old or old.get("mtime_ns") == new.get("mtime_ns"):
            continue
        if digest(new) != old["sha256"]:
            return f"{new['path']} has other content, of as many bytes ({new['bytes']:,})"
    return None


def total_size(inputs: Sequence[InputFile]) -> int | None:
    """Total bytes on disk, or None when an input is stdin or a pipe."""
    if any(f.size is None for f in inputs):
        return None
    return sum(f.size or 0 for f in inputs)


class _CountingReader(io.RawIOBase):
    """Wraps a binary file and reports every byte read to a Progress."""

    def __init__(self, raw: BinaryIO, progress: Progress | None) -> None:
        self.raw, self.progress = raw, progress

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = self.raw.readinto(b)  # type: ignore[attr-defined]
        if n and self.progress is not None:
            self.progress.advance(n)
        return n or 0

    def close(self) -> None:
        """Close the file too (not standard input, which is not ours to close)."""
        if not self.closed and self.raw is not sys.stdin.buffer:
            self.raw.close()
        super().close()


class _Decompressed(io.BufferedReader):
    """A decompressed stream that closes the compressed one under it when closed: gzip's,
    bz2's and lzma's readers leave open a file object they were given."""

    def __init__(self, raw: BinaryIO, under: io.BufferedReader) -> None:
        super().__init__(raw, buffer_size=1 << 20)  # type: ignore[arg-type]
        self.under = under

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.under.close()


def open_text_stream(path: str, progress: Progress | None = None) -> io.BufferedReader:
    """Open an input as a decompressed binary stream, refusing binary files. Closing the
    stream closes the file (and a refused one is closed before the error)."""
    if path == STDIN:
        raw: BinaryIO = sys.stdin.buffer
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed through the stream returned
        except OSError as e:
            raise UserError(f"{path}: cannot open ({e.strerror}).") from None
    stream = io.BufferedReader(_CountingReader(raw, progress), buffer_size=1 << 20)
    try:
        head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
        for magic, kind in COMPRESSED_MAGIC:
            if head.startswith(magic):
                stream = _Decompressed(DECOMPRESSORS[kind](stream), stream)
                try:
                    head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
                except (OSError, EOFError, lzma.LZMAError) as e:
                    raise UserError(f"{path}: damaged {kind} file ({e}).") from None
                break
        check_not_binary(path, head)
    except BaseException:
        if path != STDIN:
            stream.close()
        raise
    return stream


def check_not_binary(path: str, head: bytes) -> None:
    """Refuse a stream whose first bytes show it is not UTF-8 text."""
    if head.startswith(b"\xef\xbb\xbf"):
        return
    for magic, kind in BINARY_MAGIC:
        if head.startswith(magic):
            hint = BINARY_HINTS.get(kind, LEAVE_OUT)
            raise UserError(f"{path}: this is {kind}, not a text corpus; {hint}.")
    if len(head) >= 257 + 5 and head[257:262] == b"ustar":
        raise UserError(f"{path}: this is a tar archive; unpack it and pass the directory.")
    if not head:
        return
    # Text has almost no NULs and decodes as UTF-8; cut a possibly split last character.
    text = head[:-4] if len(head) == SNIFF_BYTES else head
    bad = text.decode("utf-8", errors="replace").count("\ufffd")
    too_many_nuls = head.count(0) >= 4 and head.count(0) > len(head) // 100
    mostly_bad = len(text) >= 64 and bad > len(text) // 10
    if not too_many_nuls and mostly_bad and (word := eight_bit_word(text)):
        raise UserError(
            f"{path}: not UTF-8 but text in a single-byte encoding (its first such word, "
            f"read as Windows-1252: {word!r}); convert it to UTF-8 first, e.g. `iconv -f "
            f"WINDOWS-1252 -t UTF-8 {path} > {Path(path).stem}.utf8.txt` (ISO-8859-1 for "
            "Latin-1, ISO-8859-9 for Turkish, WINDOWS-1251 for Cyrillic), and read that file "
            "instead of this one."
        )
    if too_many_nuls or mostly_bad:
        raise UserError(
            f"{path}: looks binary (NUL bytes or mostly invalid UTF-8 in its first "
            f"{len(head)} bytes), not a text corpus; {LEAVE_OUT}."
        )


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_EIGHT_BIT_WORD = re.compile(r"\w*[^\x00-\x7f]\w*")


def eight_bit_word(text: bytes) -> str | None:
    """Where bytes that are not UTF-8 read as text in a single-byte encoding (Latin-1,
    Windows-1252, ISO-8859-9, Windows-1251...): no control characters but tabs and line ends,
    and most bytes above 0x7F letters (as Windows-1252 reads them). Its first word with such
    a byte, as Windows-1252 reads it; else None."""
    s = text.decode("cp1252", errors="replace")
    high = [c for c in s if ord(c) > 0x7F]
    if not high or _CONTROL.search(s) or sum(c.isalpha() for c in high) < 0.8 * len(high):
        return None
    found = _EIGHT_BIT_WORD.search(s)
    return found.group() if found else None


def _blocks(stream: BinaryIO, cr_only: bool) -> Iterator[bytes]:
    """Blocks of whole lines (each ends with \\n, but maybe the last), about 1 MB each."""
    rest = b""
    while block := stream.read(1 << 20):
        if cr_only:
            block = block.replace(b"\r", b"\n")
        block = rest + block
        cut = block.rfind(b"\n") + 1
        rest = block[cut:]
        if cut:
            yield block[:cut]
    if rest:
        yield rest


def iter_lines(
    inputs: Sequence[InputFile],
    stats: CorpusStats,
    *,
    strict_utf8: bool = False,
    progress: Progress | None = None,
) -> Iterator[tuple[str, InputFile | None]]:
    """Yield (stripped line, its input on a file's first line, else None) for every line of
    every input, in order.

    Blocks of lines are decoded at once (the fast path); a block with invalid UTF-8 is
    decoded line by line to drop, count and locate the bad bytes."""
    for inp in inputs:
        stats.files += 1
        stream = open_text_stream(inp.path, progress)
        try:
            head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
            cr_only = b"\r" in head and b"\n" not in head
            new_file: InputFile | None = inp
            lineno = offset = 0
            for block in _blocks(stream, cr_only):
                if lineno == 0 and block.startswith(b"\xef\xbb\xbf"):
                    block, offset = block[3:], 3
                try:
                    lines = block.decode("utf-8").split("\n")
                except UnicodeDecodeError:
                    lines = decode_lines(block, inp.path, lineno, offset, stats, strict_utf8)
                if block.endswith(b"\n"):
                    lines.pop()
                stats.lines += len(lines)
                stats.bytes += len(block)
                lineno += len(lines)
                offset += len(block)
                for line in lines:
                    yield line.strip(), new_file
                    new_file = None
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise UserError(f"{inp.path}: read error ({e}); is the file damaged?") from None
        finally:
            if inp.path != STDIN:
                stream.close()


def decode_lines(
    block: bytes, path: str, lineno: int, offset: int, stats: CorpusStats, strict: bool
) -> list[str]:
    """Decode a block line by line, dropping invalid bytes (or raising, when strict)."""
    out = []
    for i, raw in enumerate(block.split(b"\n"), lineno + 1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            at = f"byte {offset + e.start} of the file (byte {e.start} of the line)"
            out.append(drop_invalid(raw, f"{path}:{i}", at, stats, strict))
        offset += len(raw) + 1
    return out


def drop_invalid(raw: bytes, where: str, at: str, stats: CorpusStats, strict: bool) -> str:
    """A line's (or row's) bytes that are not valid UTF-8, as text without the bad bytes (as
    Google's script reads them), the line counted; with `strict`, an error naming `where`
    and the first bad byte (`at`)."""
    if strict:
        raise UserError(
            f"{where}: invalid UTF-8 at {at}; fix the file, or drop --strict-utf8 to drop bad "
            "bytes."
        ) from None  # called while handling the UnicodeDecodeError: this error alone
    stats.bad_line(where)
    return raw.decode("utf-8", errors="ignore")


def iter_items(
    inputs: Sequence[InputFile],
    stats: CorpusStats,
    *,
    text_field: str | None = TEXT_FIELD,
    strict_utf8: bool = False,
    progress: Progress | None = None,
) -> Iterator[tuple[str | list[str] | None, InputFile | None]]:
    """Yield (item, its input on a file's first item, else None). The items of a text file are
    its stripped lines. A file whose first non-blank line is a JSON object with `text_field`
    is JSON Lines (`is_json_lines`): its items are its records, each the list of its text's
    non-blank stripped lines (None where the field is not a string); blank lines are skipped.
    A Parquet or Arrow file's items are its rows, alike (`table_records`). `text_field` None
    reads every file as text, as Google's script does (and so refuses those as binary)."""
    for inp in inputs:
        if text_field is not None and (kind := table_kind(inp.path)):
            rows = table_records(inp, kind, text_field, stats, progress, strict_utf8)
            for row, lines in enumerate(rows):
                yield lines, None if row else inp
            continue
        lines = iter_lines([inp], stats, strict_utf8=strict_utf8, progress=progress)
        lineno = 0
        for line, start in lines:  # up to the first non-blank line, which tells the format
            lineno += 1
            if not line:
                yield line, start
                continue
            if not is_json_lines(line, text_field, f"{inp.path}:{lineno}", stats):
                stats.text_files += 1
                stats.first_text_file = stats.first_text_file or inp.path
                yield line, start
                yield from lines  # text: the rest as it comes (the fast path)
                break
            assert text_field is not None
            yield record_lines(line, text_field, f"{inp.path}:{lineno}", stats, strict_utf8), start
            for line, _ in lines:
                lineno += 1
                if line:
                    where = f"{inp.path}:{lineno}"
                    yield record_lines(line, text_field, where, stats, strict_utf8), None
            break


def is_json_lines(line: str, text_field: str | None, where: str, stats: CorpusStats) -> bool:
    """Whether a file whose first non-blank line (at `where`) is `line` reads as JSON Lines:
    the line is a JSON object with `text_field` (an object without it is an error naming the
    fields it has). With `text_field` None (Google's mode) a JSON object is only counted. A
    file that starts as one JSON array (`[{...}, ...]`, pandas' and datasets' to_json without
    lines=True) is an error: read as text, it would be one long line of JSON syntax."""
    if text_field is not None and (line == "[" or line.startswith(('[{"', '["'))):
        raise UserError(
            f"{where}: the file starts as one JSON array, which bertforge does not read; write "
            "it as JSON Lines, one record per line (jq -c '.[]' FILE > FILE.jsonl, or "
            "to_json(..., lines=True))."
        )
    if not line.startswith("{"):
        return False
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not isinstance(record, dict):
        return False
    if text_field is None:
        stats.json_as_text += 1
        return False
    if text_field not in record:
        fields = ", ".join(f'"{k[:40]}"' for k in itertools.islice(record, 12))
        raise UserError(
            f'{where}: a JSON Lines record without a "{text_field}" field (its fields: '
            f"{fields}); name the field that holds the text with --text-field, or leave "
            "the file out of the input if it is not corpus."
        )
    stats.json_files += 1
    stats.record_field = text_field
    return True


def record_lines(
    line: str, text_field: str, where: str, stats: CorpusStats, strict: bool
) -> list[str] | None:
    """One JSON Lines record's text as a document (`text_lines`); a line that is not a JSON
    object is an error naming file:line."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise UserError(
            f"{where}: not valid JSON ({e}); the file reads as JSON Lines (its first line is a "
            "JSON object), so each non-blank line must be one record. Fix or delete the line."
        ) from None
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: a JSON {type(record).__name__}, not an object; the file reads as JSON "
            "Lines, so each non-blank line must be one record (an object). Fix or delete it."
        )
    return text_lines(record.get(text_field), where, stats, strict)


def table_kind(path: str) -> str | None:
    """The form of a Parquet or Arrow file ("Parquet", "Arrow"), by its magic number; None for
    any other file, and for stdin or a pipe (both forms are read by path, and a stream's
    first bytes cannot be read twice)."""
    if is_stream(path):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(len(ARROW_FILE_MAGIC))
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror}).") from None
    if head.startswith(PARQUET_MAGIC):
        return "Parquet"
    if head.startswith((ARROW_FILE_MAGIC, ARROW_STREAM_MAGIC)):
        return "Arrow"
    return None


def table_records(
    inp: InputFile,
    kind: str,
    text_field: str,
    stats: CorpusStats,
    progress: Progress | None,
    strict_utf8: bool = False,
) -> Iterator[list[str] | None]:
    """The rows of a Parquet or Arrow file (`table_kind`), each as `text_lines` of its
    `text_field` column, read a few rows at a time in flat memory by pyarrow (`pip install
    'bertforge[parquet]'`); a string column of pandas' categories is decoded as it comes."""
    a_file = f"{'an' if kind == 'Arrow' else 'a'} {kind} file"
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ModuleNotFoundError:
        raise UserError(
            f"{inp.path}: {a_file}; reading it needs pyarrow: pip install 'bertforge[parquet]' "
            "(or pyarrow)."
        ) from None
    except ImportError as e:  # installed, but not for this environment (pyarrow 20+: NumPy 2)
        raise UserError(f"{inp.path}: {a_file}; pyarrow, which reads it, fails to import "
                        f"here: {e}") from None  # fmt: skip
    fix = "name the column that holds the text with --text-field"
    try:
        schema, batches = (open_parquet if kind == "Parquet" else open_arrow)(inp.path)
        if text_field not in schema.names:
            columns = ", ".join(f'"{name[:40]}"' for name in schema.names[:12])
            raise UserError(
                f'{inp.path}: {a_file} without a "{text_field}" column (its columns: '
                f"{columns}); {fix}."
            )
        declared = text_type = schema.field(text_field).type
        if pa.types.is_dictionary(declared):
            text_type = declared.value_type
        if not is_string_type(pa, text_type):
            raise UserError(f'{inp.path}: its "{text_field}" column holds {declared}, not text; '
                            f"{fix}.")  # fmt: skip
        stats.files += 1
        stats.parquet_files += kind == "Parquet"
        stats.arrow_files += kind == "Arrow"
        if kind == "Arrow" and DATASETS_CACHE.fullmatch(os.path.basename(inp.path)):
            stats.arrow_caches += 1
            stats.first_arrow_cache = stats.first_arrow_cache or inp.path
        stats.record_field = text_field
        row = done = 0
        for column, share in batches(text_field):
            for start in range(0, len(column), TABLE_ROWS):
                rows = column.slice(start, TABLE_ROWS)
                if rows.type != text_type:
                    rows = rows.cast(text_type)
                texts = utf8_texts(rows, pa, inp.path, row + 1, stats, strict_utf8)
                stats.bytes += pc.sum(pc.binary_length(rows)).as_py() or 0
                stats.lines += len(rows)
                for text in texts:
                    row += 1
                    yield text_lines(text, f"{inp.path}: row {row}", stats, strict_utf8)
            if progress is not None:
                now = int((inp.size or 0) * share)
                progress.advance(now - done)
                done = now
        if progress is not None:  # the file's end: a stream's end-of-stream marker
            progress.advance((inp.size or 0) - done)
    except (OSError, pa.ArrowException) as e:
        raise UserError(
            f"{inp.path}: cannot read it as {kind} ({e}); is the file damaged or incomplete?"
        ) from None


def utf8_texts(
    rows: Any, pa: Any, path: str, first: int, stats: CorpusStats, strict: bool
) -> list[str | None]:
    """A batch of a string column as Python strings. Arrow does not check on reading that a
    string column holds UTF-8 (a damaged file does not, nor one a tool wrote bytes into), so
    the batch is checked whole first: a row with invalid UTF-8 has its bad bytes dropped and
    is counted, as a text file's line is (with `strict`, an error naming the row); damage
    beyond that (offsets out of range) is the ArrowInvalid of a damaged file."""
    try:
        rows.validate(full=True)
        return rows.to_pylist()  # type: ignore[no-any-return]
    except pa.ArrowInvalid:
        pass
    raw = rows.cast(pa.large_binary() if pa.types.is_large_string(rows.type) else pa.binary())
    raw.validate(full=True)
    out: list[str | None] = []
    for i, data in enumerate(raw.to_pylist(), first):
        try:
            out.append(None if data is None else data.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(drop_invalid(data, f"{path}: row {i}", f"byte {e.start} of its text",
                                    stats, strict))  # fmt: skip
    return out


def is_string_type(pa: Any, arrow_type: Any) -> bool:
    """string, large_string, or string_view (pyarrow 16 and later)."""
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)
    types = pa.types
    return (
        types.is_string(arrow_type)
        or types.is_large_string(arrow_type)
        or is_string_view(arrow_type)
    )


TableBatches = Callable[[str], Iterator[tuple[Any, float]]]


def open_parquet(path: str) -> tuple[Any, TableBatches]:
    """A Parquet file's schema, and a column's batches, each with the share of the file's rows
    read by its end. The Hugging Face Hub serves datasets so (fineweb-2, CulturaX). Read
    through a buffered stream: by default pyarrow would hold a row group's whole column chunk,
    which can be gigabytes (a row group of 248 MB of text took 150 MB of Arrow memory,
    buffered 12 MB)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    rows = max(f.metadata.num_rows, 1)

    def batches(column: str) -> Iterator[tuple[Any, float]]:
        read = 0
        for batch in f.iter_batches(batch_size=TABLE_ROWS, columns=[column]):
            read += batch.num_rows
            yield batch.column(0), read / rows

    return f.schema_arrow, batches


def open_arrow(path: str) -> tuple[Any, TableBatches]:
    """An Arrow IPC file's or stream's schema, and a column's batches, each with the share of
    the file read by its end. Hugging Face datasets keep their cache and `save_to_disk` output
    as Arrow streams, in batches of 1,000 rows. A batch is read whole (all its columns) and let
    go before the next: not memory-mapped, as datasets reads them, since the mapped pages
    would count in the process's memory as it went, and a file cut while mapped would crash
    the process rather than raise. A stream must end with Arrow's end-of-stream marker:
    pyarrow reads one cut short between two batches as whole."""
    import pyarrow as pa

    source = pa.OSFile(path)
    size = max(source.size(), 1)
    if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
        source.seek(0)
        file = pa.ipc.open_file(source)
        count = file.num_record_batches

        def file_batches(column: str) -> Iterator[tuple[Any, float]]:
            index = file.schema.get_field_index(column)
            with source:
                for i in range(count):
                    yield file.get_batch(i).column(index), (i + 1) / count

        return file.schema, file_batches
    source.seek(0)
    stream = pa.ipc.open_stream(source)

    def stream_batches(column: str) -> Iterator[tuple[Any, float]]:
        index = stream.schema.get_field_index(column)
        with source:
            for batch in stream:
                yield batch.column(index), source.tell() / size
            source.seek(max(size - len(ARROW_STREAM_END), 0))
            if source.read() != ARROW_STREAM_END:
                raise OSError("the stream ends without Arrow's end-of-stream marker; cut short?")

    return stream.schema, stream_batches


def text_lines(text: Any, where: str, stats: CorpusStats, strict: bool) -> list[str] | None:
    """A record's text as a document: its non-blank stripped lines, split at newlines as a
    file's lines are (None, counted, when it is missing or not a string). A lone surrogate
    (JSON's "\\ud800") is invalid text: dropped and counted like invalid UTF-8."""
    stats.records += 1
    if not isinstance(text, str):
        stats.records_without_text += 1
        stats.first_without_text = stats.first_without_text or where
        return None
    if not text.isascii() and SURROGATE.search(text):
        if strict:
            raise UserError(
                f"{where}: a lone surrogate escape in the record's text (invalid Unicode); fix "
                "the record, or drop --strict-utf8 to drop such characters."
            )
        text = SURROGATE.sub("", text)
        stats.bad_line(where)
    return [s for s in (t.strip() for t in text.split("\n")) if s]


def iter_documents(
    inputs: Sequence[InputFile],
    stats: CorpusStats,
    *,
    strict_utf8: bool = False,
    file_is_document_boundary: bool = True,
    doc_elements: bool = True,
    text_field: str | None = TEXT_FIELD,
    progress: Progress | None = None,
) -> Iterator[list[str]]:
    """Yield documents as lists of non-empty stripped lines.

    A blank line ends a document. Google's script does not end a document at the end of a
    file (the last document of one file runs on into the next); `file_is_document_boundary`
    False reproduces that, True (the default) is what users expect.

    With `doc_elements`, WikiExtractor's output (Google's README's way to a Wikipedia corpus)
    reads as it means: a `<doc id=... url=... title=...>` line starts a document and
    `</doc>` ends it, both dropped (their words would otherwise be the corpus's most frequent:
    "doc", "id", "url", "https", "curid"), and a blank line inside an element (WikiExtractor
    writes one after the title) does not end it. Google's script reads those lines as text.

    Each record of a JSON Lines file (`iter_items`: Hugging Face datasets, OSCAR, WikiExtractor
    --json) is one document, its `text_field`'s lines its sentences. Read as text, the JSON
    syntax and field names would be in the data and a non-ASCII letter would be a \\u escape.
    """
    doc: list[str] = []
    inside = False
    for item, new_file in iter_items(
        inputs, stats, text_field=text_field, strict_utf8=strict_utf8, progress=progress
    ):
        if not isinstance(item, str):  # a JSON Lines record: a document of its own
            if doc:
                stats.documents += 1
                yield doc
            doc, inside = [], False
            if item:
                stats.sentences += len(item)
                stats.documents += 1
                yield item
            continue
        line, boundary = item, new_file is not None and file_is_document_boundary
        if boundary:
            inside = False
        tag = doc_elements and line.startswith("<")  # a cheap test first: most lines are text
        tag = tag and (line == "</doc>" or DOC_START.fullmatch(line) is not None)
        ends = tag or (not line and not inside) or boundary
        if ends and doc:
            stats.documents += 1
            yield doc
            doc = []
        if tag:
            inside = line != "</doc>"
            stats.doc_elements += inside
        elif line:
            stats.sentences += 1
            doc.append(line)
    if doc:
        stats.documents += 1
        yield doc


def iter_texts(
    inputs: Sequence[InputFile],
    stats: CorpusStats,
    *,
    text_field: str = TEXT_FIELD,
    strict_utf8: bool = False,
    progress: Progress | None = None,
) -> Iterator[str]:
    """One text per line of a text file, and per record of a JSON Lines file (its lines
    joined by spaces; "" for a record without the field, so there is one per record)."""
    items = iter_items(inputs, stats, text_field=text_field, strict_utf8=strict_utf8,
                       progress=progress)  # fmt: skip
    for item, _ in items:
        yield item if isinstance(item, str) else " ".join(item or ())


def corpus_notes(corpus: Mapping[str, Any]) -> list[str]:
    """How the corpus was read, from `CorpusStats.as_dict()` (or a manifest's copy):
    WikiExtractor's elements and JSON Lines records, where there were any."""
    notes = []
    if n := corpus.get("doc_elements"):
        notes.append(
            f"read as WikiExtractor output: {n:,} <doc> elements, each one document (the tag "
            "lines dropped, blank lines inside an element ignored)"
        )
    files = [(kind, corpus.get(f"{key}_files")) for kind, key in RECORD_FILES]
    kinds = [f"{n:,} {kind}" for kind, n in files if n]
    if kinds:
        note = (
            f"read as records: {corpus.get('records', 0):,} from {' and '.join(kinds)} "
            f'file(s), the "{corpus.get("record_field")}" field of each one document'
        )
        if others := corpus.get("text_files"):  # a dataset card (README.md) among them?
            note += f"; {others:,} other file(s) read as text (the first: "
            note += f"{corpus.get('first_text_file')})"
        notes.append(note)
    return notes


def corpus_warnings(corpus: Mapping[str, Any]) -> list[str]:
    """What reading the corpus found wrong, from `CorpusStats.as_dict()`: invalid UTF-8,
    JSON Lines records without their text, JSON Lines read as text (Google's mode)."""
    found = []
    if n := corpus.get("bad_utf8_lines"):
        what = "invalid UTF-8 (bytes dropped, as Google's scripts do)"
        if corpus.get("json_files"):
            what = "invalid UTF-8 or lone surrogate escapes (dropped)"
        encoding = (
            " So many suggest a file in a single-byte encoding (Latin-1, Windows-1252, "
            "ISO-8859-9...), whose accented letters are lost: convert it to UTF-8 first "
            "(iconv -f ENCODING -t UTF-8)."
        )
        many = n >= 10 and n >= corpus.get("lines", 0) / 100
        found.append(
            f"warning: {n:,} line(s) had {what}; first at {corpus.get('first_bad_utf8_line')}. "
            f"Use --strict-utf8 to stop on them instead.{encoding if many else ''}"
        )
    if n := corpus.get("records_without_text"):
        found.append(
            f'warning: {n:,} record(s) had no string "{corpus.get("record_field")}" field '
            f"(read as empty); first at {corpus.get('first_without_text')}."
        )
    if n := corpus.get("arrow_caches"):
        found.append(
            f"warning: {n:,} Arrow file(s) are Hugging Face datasets' map() results "
            f"(cache-*.arrow, the first: {corpus.get('first_arrow_cache')}), read as corpus "
            "too; they often hold the dataset's text again. Name the dataset's own files "
            "(e.g. .../NAME-train*.arrow) to read its text once."
        )
    if n := corpus.get("json_as_text"):
        found.append(
            f"warning: {n:,} file(s) are JSON Lines, read as text as Google's script reads them: "
            "their JSON syntax and field names are in the data, and non-ASCII letters may be "
            "\\u escapes. Drop --google-compatible to read each record's text field."
        )
    return found


def require_text(stats: CorpusStats, patterns: Sequence[str]) -> None:
    """An input with no text at all is an error, not an empty result."""
    if stats.sentences == 0:
        raise UserError(
            f"--input: {', '.join(patterns)} contains no text (no non-blank line in "
            f"{stats.files} file(s)); check the path."
        )


def progress_bar(inputs: Sequence[InputFile], enabled: bool, desc: str):  # type: ignore[no-untyped-def]
    """A tqdm bar over input bytes on a terminal, else None."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total_size(inputs), unit="B", unit_scale=True, desc=desc, leave=False)
