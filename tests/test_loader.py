"""The batch loaders: a worker process (the trainer's default on Linux) and a thread, the same
batches; errors, stops and a dead worker handled."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from bertforge.batches import (
    ROW_FIELDS,
    Order,
    Prefetcher,
    PretrainingData,
    ProcessPrefetcher,
    Rows,
    step_rows,
)
from bertforge.errors import UserError
from bertforge.masking import MaskSpec
from bertforge.shards import FILES_HEADROOM, ShardSet, open_shard, record_dtype, write_shard
from tests.conftest import ROOT, run_group, run_script

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker is forked")


def made(step: int) -> Rows:
    """A batch that is a function of its step (sep_a left out, as TFRecord batches do)."""
    g = np.random.default_rng(step)
    return Rows(
        input_ids=g.integers(0, 1000, (4, 16)),
        lengths=g.integers(1, 17, 4),
        sep_a=None,
        token_type_ids=g.integers(0, 2, (4, 16)),
        next_sentence=g.integers(0, 2, 4),
        positions=g.integers(0, 16, (4, 3)),
        labels=g.integers(-100, 1000, (4, 3)),
    )


def same(a: Rows, b: Rows) -> bool:
    for name in ROW_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return False
    return True


@pytest.mark.parametrize("kind", [ProcessPrefetcher, Prefetcher])
def test_the_batches_of_each_step_in_order(kind):
    loader = kind(made, 3, 40)
    try:
        steps = []
        for step, rows in loader:  # a batch is valid until the next is asked for
            assert same(rows, made(step)), step
            steps.append(step)
    finally:
        loader.close()
    assert steps == list(range(3, 40))
    empty = kind(made, 5, 5)
    assert list(empty) == []
    empty.close()


def test_the_order_is_numpys_permutation_per_epoch_held_in_half_the_memory():
    """Order keeps each epoch's permutation as int32, and it is exactly numpy's int64
    permutation from (seed, 0, epoch): runs and checkpoints from before it see the same order."""
    order = Order(1000, 7)
    for epoch in range(4):
        perm = order.permutation(epoch)
        assert perm.dtype == np.int32
        assert np.array_equal(perm, np.random.default_rng([7, 0, epoch]).permutation(1000))
    step = order.indices(62, 16)  # positions 992..1007: the end of epoch 0, the start of 1
    first, second = order.permutation(0), order.permutation(1)
    assert np.array_equal(step, np.concatenate([first[992:], second[:8]]))
    assert len(order._cache) == 3  # at most three epochs held


def mapped(files: list[str]) -> list[str]:
    """Which of `files` this process has memory-mapped (Linux's /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return [line.split()[-1] for line in f if line.split()[-1] in files]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's maps")
def test_shards_are_read_by_position_not_mapped(train_data, tmp_path):
    """The start-up passes and reads of rows map none of the shards (so training's resident
    memory does not grow toward the size of the data as it reads it), and the rows read are
    the records a memory map of the shard holds, in the order asked for, across shards."""
    header, records = open_shard(train_data / "shard-00000.bin")
    for k, part in enumerate(np.array_split(np.asarray(records), 3)):
        with open(tmp_path / f"shard-{k}.bin", "wb") as f:
            write_shard(f, part, {**header.meta, "num_records": len(part)})
    del records
    data = PretrainingData(str(tmp_path / "shard-*.bin"))
    files = [str(p) for p in data.files]
    assert data.native is not None and len(files) == 3
    top = data.max_token_id()
    assert data.damaged_record() is None
    index = np.array([len(data) - 1, 0, 5, int(data.native.starts[1]), len(data) // 2, 5])
    rows = data.rows(index)
    assert mapped(files) == []
    assert 1000 < top < 1500
    expected = []
    for i in index.tolist():
        k = int(np.searchsorted(data.native.starts, i, side="right")) - 1
        _, records = open_shard(files[k])
        expected.append(records[i - int(data.native.starts[k])])
    assert mapped(files) != []  # the control: a memory map shows
    assert np.array_equal(rows.input_ids, np.stack([r["input_ids"] for r in expected]))
    assert np.array_equal(rows.lengths, [r["length"] for r in expected])
    assert np.array_equal(rows.sep_a, [r["sep_a"] for r in expected])
    assert np.array_equal(rows.next_sentence, [r["next_sentence_label"] for r in expected])


def test_a_resumed_run_reuses_the_start_up_check_while_the_shards_are_unchanged(
    train_data, tmp_path, monkeypatch
):
    """The start-up pass (largest token id, damaged records) reads the whole data; its result
    is kept (`save_scan`) and taken again (`reuse_scan`) while every shard has the same path,
    size, mtime and inode, so a resumed run does not read it all again. A changed shard, a
    stale or damaged file, or another data set make it read them."""
    shard = tmp_path / "data" / "shard-00000.bin"
    shard.parent.mkdir()
    shard.write_bytes((train_data / "shard-00000.bin").read_bytes())
    kept = tmp_path / "data_check.json"
    first = PretrainingData(str(shard))
    assert not first.reuse_scan(kept)  # none yet
    top = first.max_token_id()
    first.save_scan(kept)

    def no_pass(self, k):
        raise AssertionError("read the shards again")

    again = PretrainingData(str(shard))
    monkeypatch.setattr(ShardSet, "blocks", no_pass)
    assert again.reuse_scan(kept)
    assert again.max_token_id() == top and again.damaged_record() is None
    monkeypatch.undo()
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    changed = PretrainingData(str(shard))
    assert not changed.reuse_scan(kept) and changed.max_token_id() == top
    kept.write_text("{not json")
    assert not PretrainingData(str(shard)).reuse_scan(kept)
    first.save_scan(kept)  # first read the shard before its mtime changed: stale now
    assert not PretrainingData(str(shard)).reuse_scan(kept)
    changed.save_scan(kept)
    assert PretrainingData(str(shard)).reuse_scan(kept)
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-00000.bin").write_bytes(shard.read_bytes())
    assert not PretrainingData(str(other / "shard-00000.bin")).reuse_scan(kept)


def test_a_shard_cut_short_while_training_reads_it(train_data, tmp_path):
    """A shard truncated after training opened it (rewritten under a running job): reading
    its rows is one error naming it, not a short batch."""
    shard = tmp_path / "shard-00000.bin"
    shard.write_bytes((train_data / "shard-00000.bin").read_bytes())
    data = PretrainingData(str(shard))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    assert len(data.rows(np.arange(4)).lengths) == 4  # the rows before the cut still read
    with pytest.raises(UserError, match=rf"{shard}: {size - 1000} bytes now, cut short"):
        data.rows(np.array([0, len(data) - 1]))
    with pytest.raises(UserError, match="cut short"):
        data.max_token_id()


def test_shards_of_another_record_layout_in_one_data_set(tmp_path):
    """Shards made with another max_seq_length (or masking, or vocabulary width) beside each
    other: one error naming the odd shard, before any record is read."""
    for k, seq in enumerate((16, 16, 32)):
        records = np.zeros(4, dtype=record_dtype(1000, seq, 3, static_masking=False))
        records["length"], records["sep_a"] = 6, 2
        meta = {"max_seq_length": seq, "max_predictions_per_seq": 3, "static_masking": False,
                "vocab_size": 1000, "num_records": 4}  # fmt: skip
        with open(tmp_path / f"shard-{k}.bin", "wb") as f:
            write_shard(f, records, meta)
    odd = rf"{tmp_path / 'shard-2.bin'}: its records are not those of "
    with pytest.raises(UserError, match=odd + rf"{tmp_path / 'shard-0.bin'} \(another max_seq"):
        PretrainingData(str(tmp_path / "shard-*.bin"))


def test_more_shards_than_the_limit_on_open_files(tmp_path):
    """More shards than `ulimit -n` allows open files (1,024 by default on many Linux
    systems; a 6 GB corpus makes 1,500 shards): the soft limit is raised to hold them all.
    Where the hard limit is too low even for that (300, for 400 shards), the shards are opened
    as rows are read, at most `held` at once (a shard left open would run out of files),
    with a warning; the rows are the same either way."""
    dtype = record_dtype(1000, 16, 3, static_masking=False)
    meta = {"max_seq_length": 16, "max_predictions_per_seq": 3, "static_masking": False,
            "vocab_size": 1000, "num_records": 4}  # fmt: skip
    for k in range(400):
        records = np.zeros(4, dtype=dtype)
        records["length"], records["sep_a"] = 3 + np.arange(4) + k % 5, 1
        with open(tmp_path / f"shard-{k:03d}.bin", "wb") as f:
            write_shard(f, records, meta)
    script = f"""
import resource, sys
import numpy as np
from bertforge.batches import PretrainingData
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 300 if sys.argv[1:] == ["low"] else hard))
data = PretrainingData({str(tmp_path / "shard-*.bin")!r})
index = np.random.default_rng(0).permutation(np.repeat(np.arange(1600), 3))
assert data.max_token_id() == 0 and data.damaged_record() is None
print(data.native.held, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
      ",".join(map(str, data.rows(index).lengths)))
print(data.native.limit_note())
"""
    full = run_script(tmp_path / "open.py", script)
    assert full.returncode == 0, full.stderr
    held, soft, lengths = full.stdout.split("\n")[0].split()
    assert (int(held), int(soft)) == (400, 400 + FILES_HEADROOM)
    assert full.stdout.split("\n")[1] == "None"
    low = run_script(tmp_path / "low.py", script.replace("sys.argv[1:]", '["low"]'))
    assert low.returncode == 0, low.stderr
    held, soft, low_lengths = low.stdout.split("\n")[0].split()
    assert (int(held), int(soft), low_lengths) == (300 - FILES_HEADROOM, 300, lengths)
    assert len(set(lengths.split(","))) == 8  # rows of every kind, read in a random order
    assert low.stdout.split("\n")[1] == (
        "bertforge: warning: 400 shards, but this process may hold only 44 open (its limit on "
        "open files is 300, hard limit 300); rows are read reopening shards as they come, "
        f"slower. Raise the `nofile` limit to {400 + FILES_HEADROOM} (/etc/security/limits.conf, "
        "LimitNOFILE= for a systemd service, --ulimit nofile= for docker) to hold them all."
    )


def test_real_batches_with_dynamic_masks(train_data):
    data = PretrainingData(str(train_data))
    spec = MaskSpec(0.15, 10, False, 1500, 4, np.zeros(1500, dtype=bool))
    order = Order(len(data), 7)

    def make(s: int) -> Rows:
        return step_rows(data, order, spec, 7, s, 16, (4, 12))

    loader = ProcessPrefetcher(make, 0, 6)
    try:
        for step, rows in loader:
            assert same(rows, make(step)), step
            assert rows.sep_a is not None and rows.positions.shape == (8, 10)
    finally:
        loader.close()


def test_an_error_in_the_worker_is_raised_in_the_trainer():
    def make(step: int) -> Rows:
        if step == 5:
            raise UserError("shard-00002.bin: record 17 is damaged")
        return made(step)

    loader = ProcessPrefetcher(make, 0, 10)
    seen = []
    with pytest.raises(UserError, match="record 17 is damaged"):
        for step, _ in loader:
            seen.append(step)
    loader.close()
    assert seen == [0, 1, 2, 3, 4]


def test_nothing_runs_before_the_first_batch_is_asked_for():
    """As with the thread: building the loader makes nothing (an error in the first batch is
    raised where the batches are iterated), and closing an unused one is fine."""

    def make(step: int) -> Rows:
        raise UserError("no such shard")

    loader = ProcessPrefetcher(make, 0, 10)
    assert loader._worker is None
    with pytest.raises(UserError, match="no such shard"):
        next(iter(loader))
    loader.close()
    ProcessPrefetcher(made, 0, 10).close()


def test_a_batch_of_another_shape_is_an_error():
    def make(step: int) -> Rows:
        rows = made(step)
        return rows if step < 3 else Rows(*[getattr(rows, n) for n in ROW_FIELDS[:-1]], None)

    loader = ProcessPrefetcher(make, 0, 6)
    with pytest.raises(RuntimeError, match="batch of step 3: labels changed shape"):
        list(loader)
    loader.close()


def test_the_worker_ignores_the_trainers_signals_and_stops_with_close():
    """Sent while the worker starts (held up here before its first instruction), and again
    once it runs."""

    class SlowStart(ProcessPrefetcher):
        def _fill(self, *args):  # type: ignore[no-untyped-def]
            time.sleep(0.5)
            super()._fill(*args)

    loader = SlowStart(made, 0, 1000)
    it = iter(loader)
    for step in range(3):
        got, rows = next(it)
        assert got == step and same(rows, made(step))
        worker = loader._worker
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, a batch system's stop: the
            os.kill(worker.pid, sig)  # trainer decides, the worker goes on
    time.sleep(0.2)
    assert worker.is_alive()
    loader.close()
    assert not worker.is_alive()


def test_a_dead_worker_is_an_error_not_a_hang():
    loader = ProcessPrefetcher(made, 0, 1000)
    it = iter(loader)
    next(it)
    for _ in range(3):  # the worker fills the ring, then waits for a free slot
        next(it)
    os.kill(loader._worker.pid, signal.SIGKILL)
    loader._worker.join(timeout=5)
    with pytest.raises(RuntimeError, match="worker process died"):
        for _ in it:
            pass
    loader.close()


def test_a_loader_left_open_does_not_hold_up_the_exit(tmp_path):
    """multiprocessing joins its daemon processes at exit after a SIGTERM, which the worker
    ignores: a loader nobody closed must not leave the interpreter waiting for it."""
    done = run_script(
        tmp_path / "leave.py",
        "from bertforge.batches import ProcessPrefetcher\n"
        "from tests.test_loader import made\n"
        "batches = iter(ProcessPrefetcher(made, 0, 1000))\n"
        "next(batches), next(batches)\n"
        "print('leaving')\n",
    )
    assert done.returncode == 0 and done.stdout == "leaving\n", done.stderr


def six_shards(folder, top_in: int = 5, damaged_in: tuple[int, ...] = (4, 1)) -> None:
    """Six small valid shards in `folder`; token id 999 only in shard `top_in`, and a
    next-sentence label of 2 (a damaged record) at record 2 of each shard in `damaged_in`."""
    folder.mkdir()
    dtype = record_dtype(1000, 16, 3, static_masking=False)
    meta = {"max_seq_length": 16, "max_predictions_per_seq": 3, "static_masking": False,
            "vocab_size": 1000, "num_records": 4}  # fmt: skip
    for k in range(6):
        records = np.zeros(4, dtype=dtype)
        records["length"], records["sep_a"] = 5, 1
        records["input_ids"][:, :5] = 10 + k
        if k == top_in:
            records["input_ids"][3, 2] = 999
        if k in damaged_in:
            records["next_sentence_label"][2] = 2
        with open(folder / f"shard-{k}.bin", "wb") as f:
            write_shard(f, records, meta)


def test_the_start_up_pass_reads_shards_in_threads_and_names_the_first_damaged_one(
    tmp_path, monkeypatch
):
    """The start-up pass reads several shards at once (`scan_part`'s threads), and still
    reports the largest id of them all and the damaged record of the first shard in order,
    whichever thread finds one first."""
    import threading

    six_shards(tmp_path / "data")
    data = PretrainingData(str(tmp_path / "data" / "shard-*.bin"))
    together = threading.Barrier(3, timeout=10)  # broken unless 3 shards are read at once
    blocks = ShardSet.blocks
    seen: set[int] = set()

    def side_by_side(self, k):
        if threading.get_ident() not in seen:
            seen.add(threading.get_ident())
            together.wait()
        return blocks(self, k)

    monkeypatch.setattr(ShardSet, "blocks", side_by_side)
    top, damaged = data.scan_part(range(6), threads=3)
    first = tmp_path / "data" / "shard-1.bin"
    assert (top, damaged) == (999, (1, f"{first}: record 2: next-sentence label 2, not 0 or 1"))
    assert len(seen) == 3
    monkeypatch.undo()
    assert data.max_token_id() == 999
    assert data.damaged_record() == f"{first}: record 2: next-sentence label 2, not 0 or 1"
    fourth = damaged[1].replace("shard-1.bin", "shard-4.bin")
    assert data.scan_part([4, 5], threads=2) == (999, (4, fourth))


def test_the_start_up_pass_stops_at_an_error_or_ctrl_c(tmp_path, monkeypatch):
    """A shard's error (or Ctrl-C) during the start-up pass stops it there: the shards not
    begun are not read (`Executor.map` cancels them as its results stop being taken; all
    futures submitted and then awaited would read every shard first, minutes on a large
    data set while Ctrl-C seemed to do nothing)."""
    six_shards(tmp_path / "data")
    data = PretrainingData(str(tmp_path / "data" / "shard-*.bin"))
    read = []

    def interrupted(self, k):
        read.append(k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardSet, "blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.scan_part(range(6), threads=1)
    assert read == [0]


SHARED_CHECK = """
import os, sys
from bertforge import distributed, train
from bertforge.batches import PretrainingData
from bertforge.errors import UserError
from bertforge.shards import ShardSet

d = distributed.setup("cpu")
data = PretrainingData(sys.argv[1])
if sys.argv[2] == "cut":  # shard 3 cut short after both processes opened the data
    distributed.barrier(d)
    if d.main:
        os.truncate(data.files[3], os.path.getsize(data.files[3]) - 10)
    distributed.barrier(d)
blocks, read = ShardSet.blocks, []
ShardSet.blocks = lambda self, k: (read.append(k), blocks(self, k))[1]
try:
    train.share_data_check(data, d, reused=sys.argv[2] == "reused")
    shared = list(read)
    line = f"{d.rank} {shared} {data.max_token_id()} {data.damaged_record()}"
except UserError as e:
    line = f"{d.rank} error: {e}"
os.write(1, (line + "\\n").encode())  # one write: the two processes' lines do not mix
distributed.shutdown(d)
"""


@pytest.mark.slow
def test_torchrun_processes_share_the_start_up_pass(tmp_path):
    """torchrun with 2 gloo processes: each reads every other shard, and both learn the
    largest id (in shard 5, read by process 1) and the first damaged record (shard 1's, read
    by process 1; shard 4's, read by process 0, comes later). When both took a resumed run's
    result, neither reads in the shared pass. A shard cut short under process 1's part stops
    both with its error; neither waits for the other."""
    import sys

    six_shards(tmp_path / "data")
    (tmp_path / "check.py").write_text(SHARED_CHECK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun(how: str) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29524", str(tmp_path / "check.py"),
               str(tmp_path / "data" / "shard-*.bin"), how]  # fmt: skip
        done = run_group(cmd, timeout=120, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return sorted(line for line in done.stdout.splitlines() if line[:2] in ("0 ", "1 "))

    first = tmp_path / "data" / "shard-1.bin"
    damaged = f"{first}: record 2: next-sentence label 2, not 0 or 1"
    assert torchrun("fresh") == [f"0 [0, 2, 4] 999 {damaged}", f"1 [1, 3, 5] 999 {damaged}"]
    assert torchrun("reused") == [f"0 [] 999 {damaged}", f"1 [] 999 {damaged}"]
    lines = torchrun("cut")
    assert [line[:9] for line in lines] == ["0 error: ", "1 error: "]
    cut = tmp_path / "data" / "shard-3.bin"
    size = cut.stat().st_size  # 10 bytes short now
    assert lines[0][9:] == lines[1][9:] and lines[0][9:].startswith(f"{cut}: {size} bytes now")
