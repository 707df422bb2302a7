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
from tests.conftest import run_script

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
