"""Build public-domain (or build-only) corpora in Google's format for demos and benchmarks.

- `kjv`: the King James Bible from Debian's bible-kjv + bible-kjv-text (public domain text):
  one verse per line, one chapter per document. `src/bertforge/demo/kjv.txt.gz` is this output.
- `gcide`: the GNU Collaborative International Dictionary of English from Debian's dict-gcide
  (GPL: built here for benchmarks, never shipped): one definition per line, one entry per document.
- `english`: gcide followed by kjv, the mix the benchmarks use (cut with `--max-mb`).
- `turkish`: Debian's Turkish manual pages (manpages-tr, GPL) and LibreOffice's Turkish help
  (libreoffice-help-tr, MPL 2.0), built here for benchmarks, never shipped: one paragraph per
  line, one page per document, 7.6 MB. Most of it is Turkish; some help pages keep
  LibreOffice's untranslated English paragraphs, as web text in Turkish mixes in English.
- `--repeat N` concatenates the text N times for larger benchmark corpora; `--max-mb` cuts it.

Needs `apt-get` (packages are downloaded and unpacked in a work directory, not installed).

    python bench/corpora.py kjv --output bench/work/kjv.txt
    python bench/corpora.py gcide --output bench/work/gcide.txt --max-mb 30
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

HEADING = re.compile(r"^(\d )?[A-Z][A-Za-z ]* \d+$")
VERSE = re.compile(r"^\s+(\d+) (.*)$")
HTML_BLOCKS = frozenset({"p", "div", "li", "h1", "h2", "h3", "h4", "td", "tr", "br", "pre"})


def fetch_debs(packages: list[str], work: Path) -> Path:
    """Download and unpack Debian packages into work/root; returns that root."""
    root = work / "root"
    work.mkdir(parents=True, exist_ok=True)
    for name in packages:
        if not list(work.glob(f"{name}_*.deb")):
            subprocess.run(["apt-get", "download", name], cwd=work, check=True)
        deb = sorted(work.glob(f"{name}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def kjv_documents(work: Path) -> list[list[str]]:
    """The KJV as chapters of verses, parsed from the `bible` program's dump."""
    root = fetch_debs(["bible-kjv", "bible-kjv-text"], work)
    dump = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    docs: list[list[str]] = []
    doc: list[str] = []
    verse: str | None = None
    for line in dump.splitlines():
        if not line.strip():
            continue
        m = VERSE.match(line)
        if m:
            if verse is not None:
                doc.append(verse)
            verse = m.group(2).strip()
        elif HEADING.match(line):
            if verse is not None:
                doc.append(verse)
                verse = None
            if doc:
                docs.append(doc)
                doc = []
        elif verse is not None:
            verse += " " + line.strip()
    if verse is not None:
        doc.append(verse)
    if doc:
        docs.append(doc)
    assert len(docs) == 1189 and sum(map(len, docs)) == 31102, "unexpected KJV dump layout"
    return docs


def gcide_documents(work: Path) -> list[list[str]]:
    """GCIDE entries: the headword line and each definition line of an entry form a document."""
    root = fetch_debs(["dict-gcide"], work)
    data = next((root / "usr/share/dictd").glob("gcide.dict.dz"))
    text = gzip.decompress(data.read_bytes()).decode("utf-8", errors="replace")
    docs: list[list[str]] = []
    for block in re.split(r"\n(?=\S)", text):
        lines = [" ".join(s.split()) for s in re.split(r"\n\s*\n", block)]
        lines = [s for s in lines if len(s) > 1]
        if len(lines) >= 2:
            docs.append(lines)
    return docs


def turkish_documents(work: Path) -> list[list[str]]:
    """Turkish manual pages (roff, the macro lines dropped and the font escapes taken out) and
    LibreOffice's Turkish help pages (HTML, scripts and styles dropped, a line per block)."""
    root = fetch_debs(["manpages-tr", "libreoffice-help-tr"], work)
    docs = [man_lines(gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace"))
            for f in sorted((root / "usr/share/man/tr").rglob("*.gz"))]  # fmt: skip
    for f in sorted((root / "usr/share/libreoffice/help").rglob("*.html")):
        page = HelpText()
        page.feed(f.read_text(encoding="utf-8", errors="replace"))
        docs.append(clean_lines("".join(page.out).split("\n")))
    return [d for d in docs if d]


def clean_lines(lines: list[str]) -> list[str]:
    lines = [" ".join(line.split()) for line in lines]
    return [line for line in lines if len(line) > 1]


def man_lines(roff: str) -> list[str]:
    """A manual page's text: headings and paragraphs, without roff's requests and comments."""
    out, ignoring = [], False
    for line in roff.split("\n"):
        if ignoring or line.startswith(".ig"):
            ignoring = not line.startswith("..")
            continue
        if line.startswith((".SH", ".SS")):
            line = line[3:].strip().strip('"')
        elif line.startswith((".", "'")):
            continue
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\&|\\e", "", line)
        out.append(line.replace("\\-", "-").replace("\\ ", " "))
    return clean_lines(out)


class HelpText(HTMLParser):
    """The text of an HTML page, a line break at each block element."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[str] = []
        self.hidden = 0  # inside <script> or <style>

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.hidden += tag in ("script", "style")
        if tag in HTML_BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.out.append(data)


def write_corpus(docs: list[list[str]], output: Path, repeat: int, max_mb: float | None) -> None:
    """Write docs in Google's format (gzip when the name ends in .gz, with a fixed mtime)."""
    body = "\n\n".join("\n".join(d) for d in docs) + "\n"
    data = ((body + "\n") * repeat).encode("utf-8")
    if max_mb is not None:
        cut = data[: int(max_mb * 1e6)]
        data = cut[: cut.rfind(b"\n\n") + 1]
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    output.write_bytes(data)
    print(f"wrote {output} ({len(data) / 1e6:.1f} MB)", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=["kjv", "gcide", "english", "turkish"])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("bench/work/debs"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--max-mb", type=float, default=None)
    args = parser.parse_args()
    write_corpus(build(args.corpus, args.work), args.output, args.repeat, args.max_mb)


def build(corpus: str, work: Path) -> list[list[str]]:
    """Documents of a named corpus."""
    if corpus == "kjv":
        return kjv_documents(work)
    if corpus == "gcide":
        return gcide_documents(work)
    if corpus == "turkish":
        return turkish_documents(work)
    return gcide_documents(work) + kjv_documents(work)


if __name__ == "__main__":
    main()
