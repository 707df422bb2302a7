"""Build public-domain (or build-only) English corpora in Google's format for demos and benchmarks.

- `kjv`: the King James Bible from Debian's bible-kjv + bible-kjv-text (public domain text):
  one verse per line, one chapter per document. `src/bertforge/demo/kjv.txt.gz` is this output.
- `gcide`: the GNU Collaborative International Dictionary of English from Debian's dict-gcide
  (GPL: built here for benchmarks, never shipped): one definition per line, one entry per document.
- `english`: gcide followed by kjv, the mix the benchmarks use (cut with `--max-mb`).
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
from pathlib import Path

HEADING = re.compile(r"^(\d )?[A-Z][A-Za-z ]* \d+$")
VERSE = re.compile(r"^\s+(\d+) (.*)$")


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
    parser.add_argument("corpus", choices=["kjv", "gcide", "english"])
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
    return gcide_documents(work) + kjv_documents(work)


if __name__ == "__main__":
    main()
