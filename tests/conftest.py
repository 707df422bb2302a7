"""Shared helpers: tiny corpora written on the fly; the bundled demo corpus; a full disk; the
benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import errno
import gzip
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bertforge import fileio
from bertforge.cli import demo_corpus

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_script(path: Path, text: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`text` written to `path` and run as a Python script from the repository's root, with
    the root importable (tests' helpers: `from tests.test_x import ...`)."""
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def vocab_head(vocab: Path, n: int, folder: Path) -> Path:
    """folder/vocab.txt: the first n tokens of the vocab directory `vocab` (a vocabulary too
    small for data made with the whole one)."""
    folder.mkdir()
    tokens = (vocab / "vocab.txt").read_text().split()[:n]
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    return folder / "vocab.txt"


def run_group(
    cmd: list[str], timeout: float, check: bool = False, capture_output: bool = False, **kw: Any
) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, killed whole on a timeout or an interrupt:
    torchrun's workers and inductor's compile workers too, which subprocess.run's kill of the
    launcher leaves running (under torch 2.4 a hung two-process test's workers kept running
    for the rest of the suite)."""
    if capture_output:
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:  # the timeout, or Ctrl-C (the group is out of the terminal's)
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    done = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def _bench_file(name: str, module_name: str) -> tuple[Any, Any]:
    """bench/NAME.py as a module called module_name, not yet run, and its loader."""
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    return importlib.util.module_from_spec(spec), spec.loader


def bench_module(name: str) -> Any:
    """bench/NAME.py, loaded by path (bench/ is not a package); one that imports no other
    bench module."""
    module, loader = _bench_file(name, f"bench_{name}")
    loader.exec_module(module)
    return module


@contextlib.contextmanager
def bench_script(name: str) -> Iterator[Any]:
    """bench/NAME.py as the module NAME, for a script that imports other bench modules (bench/
    on sys.path meanwhile) or whose dataclasses look their module up (in sys.modules
    meanwhile)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        module, loader = _bench_file(name, name)
        sys.modules[name] = module
        loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(ROOT / "bench"))


def pytest_configure(config: pytest.Config) -> None:
    """Under `pytest -n N` (make test: 2 workers) each worker, and each process it starts,
    computes on its share of the CPUs. Left to torch, each of the 2 workers on a 2-core
    machine ran 2 threads: the oversubscribed OpenMP threads spun against each other, and a
    5-second test (test_tiny_model_learns) took 35 seconds beside another. OMP_NUM_THREADS
    set beforehand (and tests of the default, which remove it) are left alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        from bertforge.workers import usable_cpus

        share = max(1, usable_cpus() // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@pytest.fixture(scope="session", autouse=True)
def fp32_on_every_cpu() -> Any:
    """Tests compare losses (to 1e-5) and vectors closely: in this process they train and
    embed as on a CPU without bf16 in hardware (`hardware.cpu_has_bf16`), in fp32 where
    `--precision auto` would choose bf16. Tests of that choice patch it themselves; a
    subprocess whose losses are compared with this process's is given --precision fp32."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bertforge.hardware.cpu_has_bf16", lambda: False)
        yield


MIXED_DOCS = [
    ["The quick brown fox jumps over the lazy dog.", "It was not amused, said Mr. Smith!"],
    ["İstanbul'da ılık bir gün; çocuklar şarkı söylüyor.", "Öğretmen güldü: ğ ü ş ç ö ı."],
    ["Blåbærsyltetøy på brødskiva er godt.", "Ærlig talt, det var søtt."],
    ["東京は日本の首都です。", "Café, naïve, résumé — déjà vu."],
    ["مرحبا بالعالم", "Emoji 🙂 and zero\u200bwidth and control\x07chars."],
]


def write_corpus(path: Path, docs: list[list[str]], compress: bool = False) -> Path:
    """Write documents in Google's format (blank line between documents)."""
    text = "\n\n".join("\n".join(d) for d in docs) + "\n"
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_arrow(path: Path, table: Any, rows: int, form: str = "stream") -> None:
    """An Arrow stream (as Hugging Face datasets' cache and save_to_disk hold) or file of
    `table`, in batches of `rows` rows."""
    pa = pytest.importorskip("pyarrow")
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if form == "stream" else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=rows):
                writer.write_batch(batch)


def report_of(out: Path, **dirs: str) -> str:
    """The report.md that `bertforge run` writes for the stage directories under `out` (stages
    not given point at directories that do not exist), from an empty run.json."""
    from bertforge.report import write_report

    (out / "run.json").write_text("{}")
    write_report(out, {"vocab": "v", "data": "d", "train": "t", "export": "m", **dirs})
    return (out / "report.md").read_text(encoding="utf-8")


@pytest.fixture
def mixed_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "mixed.txt", MIXED_DOCS * 20)


@pytest.fixture(scope="session")
def demo_path() -> Path:
    return demo_corpus()


@pytest.fixture(scope="session")
def kjv_corpus(tmp_path_factory: pytest.TempPathFactory, demo_path: Path) -> Path:
    """About 300 KB: the first 80 chapters of the demo corpus plus the mixed documents."""
    chapters = gzip.decompress(demo_path.read_bytes()).decode().split("\n\n")[:80]
    docs = [c.split("\n") for c in chapters] + MIXED_DOCS * 4
    return write_corpus(tmp_path_factory.mktemp("corpus") / "kjv.txt", docs)


@pytest.fixture(scope="session")
def kjv_vocab(tmp_path_factory: pytest.TempPathFactory, kjv_corpus: Path) -> Path:
    """A 1,500-token uncased vocab directory trained on kjv_corpus."""
    from bertforge.config import VocabConfig
    from bertforge.vocab import train_vocab

    out = tmp_path_factory.mktemp("vocab")
    train_vocab(VocabConfig(input=(str(kjv_corpus),), output=str(out), vocab_size=1500,
                            progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory, kjv_corpus: Path, kjv_vocab: Path) -> Path:
    """Native shards (dynamic masking) of kjv_corpus at max_seq_length 64."""
    from bertforge.config import DataConfig
    from bertforge.data import create_data

    out = tmp_path_factory.mktemp("train_data")
    create_data(DataConfig(input=(str(kjv_corpus),), vocab=str(kjv_vocab), output=str(out),
                           max_seq_length=64, max_predictions_per_seq=10, workers=1,
                           progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_bert_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide bert_config.json for kjv_vocab, without dropout (exact comparisons)."""
    import json

    path = tmp_path_factory.mktemp("bert") / "bert_config.json"
    path.write_text(json.dumps({
        "vocab_size": 1500, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 128, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 128, "type_vocab_size": 2, "initializer_range": 0.02,
    }))  # fmt: skip
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, train_data: Path,
                tiny_bert_config: Path) -> Path:  # fmt: skip
    """A `bertforge train` directory: the tiny model after 30 steps on train_data, evaluated."""
    from bertforge.config import TrainConfig
    from bertforge.train import train

    out = tmp_path_factory.mktemp("trained")
    train(TrainConfig(data=str(train_data), output=str(out), bert_config=str(tiny_bert_config),
                      train_batch_size=16, num_train_steps=30, learning_rate=2e-3,
                      eval_records=40, save_checkpoints_steps=30, progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Path:
    """trained_run exported as a Hugging Face directory."""
    from bertforge.config import ExportConfig
    from bertforge.export import export

    out = tmp_path_factory.mktemp("exported")
    export(ExportConfig(checkpoint=str(trained_run), output=str(out), overwrite=True))
    return out


class FullDisk:
    """Every file bertforge writes (all go through `fileio.atomic_open`) fails as on a full
    disk once `room` bytes (characters, for text) have been written in all: the write that
    crosses the line writes what fits, then raises OSError(ENOSPC). `room = None` frees it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int | None) -> None:
        self.room = room
        disk = self

        class Os:  # fileio's view of `os`, with fdopen metered
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def fdopen(self, fd: int, mode: str = "r", **kwargs: Any) -> Any:
                return _Metered(os.fdopen(fd, mode, **kwargs), disk)

        monkeypatch.setattr(fileio, "os", Os())


class _Metered:
    def __init__(self, f: Any, disk: FullDisk) -> None:
        self.f, self.disk = f, disk

    def write(self, data: Any) -> int:
        if self.disk.room is not None and len(data) > self.disk.room:
            self.f.write(data[: self.disk.room])
            self.disk.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.disk.room is not None:
            self.disk.room -= len(data)
        return self.f.write(data)

    def __enter__(self) -> _Metered:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)
