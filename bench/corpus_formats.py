"""Reading one corpus in each form it is downloaded in, measured side by side.

The demo corpus (King James Bible, 4.1 MB) is repeated --copies times and written as
Google's text format, JSON Lines (ASCII-escaped, as json.dumps writes it), JSON Lines
compressed with gzip and with zstd, Parquet (pyarrow's default, snappy), and an Arrow stream
in batches of 1,000 rows (as Hugging Face datasets' save_to_disk writes it): one record per
chapter. Each is read whole with `corpus.iter_documents`, the reading every stage does,
best of --repeats; printed are the size on disk, the text read, the documents and sentences
(which must be the same in every form) and MB/s of text. Tokenizing, the next step, runs at
about 2 MB/s per worker, so reading is far from the bottleneck in every form. The last line
is one JSON object.

    python bench/corpus_formats.py [--copies 7] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from common import demo_bench

from bertforge.corpus import CorpusStats, iter_documents, resolve_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5)
    args, work, chapters = demo_bench(p, "corpus_formats")
    chapters *= args.copies
    jsonl = "".join(json.dumps({"id": i, "text": c}) + "\n" for i, c in enumerate(chapters))
    forms = {
        "text": (work / "corpus.txt", "\n\n".join(chapters).encode() + b"\n"),
        "jsonl": (work / "corpus.jsonl", jsonl.encode()),
        "jsonl.gz": (work / "corpus.jsonl.gz", gzip.compress(jsonl.encode(), 6)),
        "jsonl.zst": (work / "corpus.jsonl.zst", zstandard.compress(jsonl.encode(), 3)),
    }
    for path, data in forms.values():
        path.write_bytes(data)
    parquet = work / "corpus.parquet"
    table = pa.table({"id": list(range(len(chapters))), "text": chapters})
    pq.write_table(table, parquet)
    arrow = work / "data-00000-of-00001.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1000):
            writer.write_batch(batch)
    paths = {name: path for name, (path, _) in forms.items()}
    paths |= {"parquet": parquet, "arrow": arrow}

    rows = {}
    print(f"{'form':10s} {'on disk':>9s} {'read':>9s} {'documents':>10s} {'sentences':>10s}"
          f" {'seconds':>8s} {'MB/s':>6s}")  # fmt: skip
    for name, path in paths.items():
        best = float("inf")
        for _ in range(args.repeats):
            stats = CorpusStats()
            start = time.perf_counter()
            sentences = sum(len(d) for d in iter_documents(resolve_inputs([str(path)]), stats))
            best = min(best, time.perf_counter() - start)
        rows[name] = {
            "disk_mb": path.stat().st_size / 1e6, "read_mb": stats.bytes / 1e6,
            "documents": stats.documents, "sentences": sentences, "seconds": best,
            "mb_per_s": stats.bytes / 1e6 / best,
        }  # fmt: skip
        r = rows[name]
        print(f"{name:10s} {r['disk_mb']:7.1f}MB {r['read_mb']:7.1f}MB {r['documents']:10,}"
              f" {r['sentences']:10,} {best:8.3f} {r['mb_per_s']:6.0f}")  # fmt: skip
    same = len({(r["documents"], r["sentences"]) for r in rows.values()}) == 1
    print(f"same documents and sentences in every form: {same}")
    print(json.dumps({"copies": args.copies, "same": same, "forms": rows}))


if __name__ == "__main__":
    main()
