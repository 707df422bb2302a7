"""`train --tune` (tune.py): the greedy search, the questions asked, the gradient check, the
trial processes (errors, deaths, timeouts), the cache, and a whole tuned run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertforge import tune
from bertforge.cli import main
from bertforge.config import TrainConfig
from bertforge.train import train
from tests.conftest import ROOT, run_group, run_script
from tests.test_train import metrics

CPU = torch.device("cpu")
BASE = {name: False for name in tune.TUNABLE}


FLOOR = tune.CHECK_FLOOR["fp32"]


def gradients(norms: list[float], loss: float = 3.0, sketch=None) -> dict:
    """A stand-in `tune.signature`: parameters p0, p1, ... with these gradient norms (and
    sketches of one bucket: that bucket's difference is the distance)."""
    sketch = sketch or [[n] for n in norms]
    return {"names": [f"p{i}" for i in range(len(norms))], "norms": norms,
            "sketch": sketch, "loss": loss}  # fmt: skip


def timed(table: dict[frozenset, float]):
    """A stand-in `measure`: seconds per step from `table` (keyed by the options on), 1.0 when
    not in it, gradients when asked to check them; the calls it got, in order (options and
    whether to check)."""
    calls: list[tuple[dict, bool]] = []

    def measure(options: dict, check: bool) -> dict:
        calls.append((options, check))
        on = frozenset(k for k, v in options.items() if v)
        checked = {"gradients": gradients([1.0, 2.0])} if check else {}
        return {"seconds": table.get(on, 1.0), **checked, "floor": FLOOR}

    return measure, calls


def never(options: dict) -> None:
    return None


def test_choose_keeps_what_is_faster_by_the_margin_and_builds_on_it():
    asked = [[{"packed": True}], [{"fused_ffn": True}, {"fused_gelu": True}], [{"split_qkv": True}]]
    table = {
        frozenset({"packed"}): 0.9,
        frozenset({"packed", "fused_ffn"}): 0.85,
        frozenset({"packed", "fused_gelu"}): 0.8,  # the faster of the question's two answers
        frozenset({"packed", "fused_gelu", "split_qkv"}): 0.79,  # under 2% better: not kept
    }
    measure, calls = timed(table)
    choice, trials = tune.choose(BASE, asked, measure, never)
    assert {k for k, v in choice.items() if v} == {"packed", "fused_gelu"}
    assert len(calls) == 7 and calls[0] == (BASE, True) and calls[6] == (choice, False)
    assert calls[5] == (BASE, False)  # timed again: its gradients were checked the first time
    assert [check for _, check in calls] == [True] * 5 + [False] * 2
    assert [t["kept"] for t in trials] == [True, True, False, True, False, True, True]
    assert trials[3]["options"] == {"packed": True, "fused_gelu": True}  # the change from BASE
    assert [t.get("again", False) for t in trials] == [False] * 5 + [True] * 2


def test_a_choice_that_does_not_hold_when_measured_again_is_dropped():
    seconds = iter([1.0, 0.8, 1.0, 1.0])  # the defaults, +packed, then again: no faster

    def measure(options: dict, check: bool) -> dict:
        return {"seconds": next(seconds), "gradients": gradients([1.0]), "floor": FLOOR}

    notes: list[str] = []
    choice, trials = tune.choose(BASE, [[{"packed": True}]], measure, never, notes.append)
    assert choice == BASE and not trials[-1]["kept"] and not trials[-2]["kept"]
    assert notes[-1].startswith("tune: measured again, the choice was not faster")
    assert notes[-2] == "tune: again, +packed: 1000.0 ms a step, 1.00x the defaults"


@pytest.mark.parametrize("then, kept", [(0.9, True), (0.99, False)])
def test_the_choice_must_beat_the_faster_of_the_defaults_two_timings(then, kept):
    """The defaults' second timing slow (1.5: noise only adds time): the choice is compared
    with their first (1.0), and the speedup is over that."""
    seconds = iter([1.0, 0.8, 1.5, then])  # the defaults, +packed, then again: both

    def measure(options: dict, check: bool) -> dict:
        return {"seconds": next(seconds), "gradients": gradients([1.0]), "floor": FLOOR}

    notes: list[str] = []
    choice, trials = tune.choose(BASE, [[{"packed": True}]], measure, never, notes.append)
    assert choice["packed"] is kept and trials[-1]["kept"] is kept
    assert tune.defaults_seconds(trials) == 1.0
    assert (
        notes[3]
        == f"tune: again, +packed: {1000 * then:.1f} ms a step, {1 / then:.2f}x the defaults"
    )


def test_choose_skips_what_cannot_run_and_what_fails_or_computes_otherwise():
    asked = [[{"packed": True}], [{"fused_norm": True}], [{"split_qkv": True}]]

    def measure(options: dict, check: bool) -> dict:
        if options["fused_norm"]:
            return {"error": "out of memory"}
        grads = [1.0, 2.5, 3.0] if options["split_qkv"] else [1.0, 2.0, 3.0]  # a wrong kernel
        return {"seconds": 0.5 if options["split_qkv"] else 1.0, "gradients": gradients(grads),
                "floor": FLOOR}  # fmt: skip

    def blocked(options: dict) -> str | None:
        return "needs CUDA" if options["packed"] else None

    choice, trials = tune.choose(BASE, asked, measure, blocked)
    assert choice == BASE
    assert [t["options"] for t in trials] == [{}, {"fused_norm": True}, {"split_qkv": True}]
    assert trials[1]["error"] == "out of memory"
    assert (
        "p1's gradient norm 2.5 against the default step's 2 in fp32" in trials[2]["error"]
        and not trials[2]["kept"]
    )
    assert trials[2]["check"]["norm"] == 0.25 and trials[2]["check"]["norm_in"] == "p1"
    assert not any("gradients" in t for t in trials)  # compared, not kept in the record


def test_choose_gives_the_defaults_when_the_default_step_fails():
    asked = [[{"packed": True}]]
    choice, trials = tune.choose(BASE, asked, lambda o, check: {"error": "boom"}, never)
    assert choice == BASE and len(trials) == 1 and not trials[0]["kept"]


def test_gradients_agree():
    """In an fp32 run (the default step is fp32's: its own distance 0) within the floor only."""
    want = gradients([1.0, 2.0, 1e-9])

    def agree(got, floor=FLOOR):
        return tune.gradients_agree(got, want, want, floor)

    check = agree(gradients([1.0, 2.0005, 0.0]))
    assert (
        "error" not in check and check["norm"] == pytest.approx(2.5e-4) and check["norm_in"] == "p1"
    )
    assert agree(gradients([1.0, 2.1, 0.0]))["error"] == (
        "p1's gradient norm 2.1 against the default step's 2 in fp32 (at most 0.1% off passes)"
    )
    assert (
        "the loss 3.1 against the default step's 3"
        in agree(gradients([1.0, 2.0, 0.0], 3.1))["error"]
    )
    assert agree(gradients([1.0, float("nan"), 0.0]))["error"] == "not finite"
    assert "2 parameters against 3" in agree(gradients([1.0, 2.0]))["error"]
    # the same norms, another direction: p1's sketch moved by 0.5 (of its norm 2.0)
    moved = gradients([1.0, 2.0, 0.0], sketch=[[1.0], [2.5], [0.0]])
    check = agree(moved)
    assert check["difference"] == pytest.approx(0.25) and check["difference_in"] == "p1"
    assert check["error"] == (
        "p1's gradient differs from the default step's in fp32 by about 25% of its norm (at "
        "most 0.1% passes)"
    )
    assert "error" not in agree(moved, {"norm": 1e-3, "difference": 0.3})


def test_a_trial_may_be_as_far_from_fp32_as_the_default_step_is():
    """bf16: the default step's p1 is 10% from fp32's (its sketch 0.2 off, of norm 2).
    A kernel that rounds elsewhere, as far the other way, is 20% from the default step but
    passes; one 1.5 times as far from fp32 as the default step plus the floor does not, nor
    does one off where the default step is not, beyond the floor."""
    floor = tune.CHECK_FLOOR["bf16"]
    exact = gradients([1.0, 2.0], sketch=[[1.0], [2.0]])
    default = gradients([1.0, 2.0], sketch=[[1.0], [2.2]])
    other_way = gradients([1.0, 2.0], sketch=[[1.0], [1.8]])
    check = tune.gradients_agree(other_way, default, exact, floor)
    assert "error" not in check and check["difference"] == pytest.approx(0.1)
    assert "error" in tune.gradients_agree(other_way, default, default, floor)  # the old rule
    limit = 1.5 * 0.1 + 0.02  # p1's
    for off, passes in ((0.98 * limit, True), (1.02 * limit, False)):
        d = 2 * off  # the sketch off by d: a distance of d, `off` of p1's norm
        got = gradients([1.0, 2.0], sketch=[[1.0], [2.0 + d]])
        assert ("error" not in tune.gradients_agree(got, default, exact, floor)) is passes
    got = gradients([1.0, 2.0], sketch=[[1.03], [2.0]])  # p0: 3% > 0 + 2%
    assert tune.gradients_agree(got, default, exact, floor)["error"].startswith(
        "p0's gradient differs from the default step's in fp32 by about 3% of its norm (at most 2%"
    )


def test_choose_checks_every_trial_against_the_default_steps_fp32_gradients():
    """The default trial brings the fp32 step's gradients ("exact"); its own distance from them
    is in its check, and sets what each trial may differ by."""
    exact = gradients([1.0, 2.0], sketch=[[1.0], [2.0]])
    default = gradients([1.0, 2.0], sketch=[[1.0], [2.2]])  # 10% off

    def sketched(p1: list[float]) -> dict:
        return gradients([1.0, 2.0], sketch=[[1.0], p1])

    by = {
        frozenset(): default,
        frozenset({"fused_norm"}): sketched([1.8]),  # 10% off the other way: passes
        frozenset({"fused_norm", "split_qkv"}): sketched([2.5]),  # 25%: over 17%
    }

    def measure(options: dict, check: bool) -> dict:
        on = frozenset(k for k, v in options.items() if v)
        extra = {"exact": exact} if not on else {}
        floor = tune.CHECK_FLOOR["bf16"]
        return {"seconds": 1.0 - 0.2 * len(on), "gradients": by[on], "floor": floor, **extra}

    notes: list[str] = []
    asked = [[{"fused_norm": True}], [{"split_qkv": True}]]
    choice, trials = tune.choose(BASE, asked, measure, never, notes.append)
    assert {k for k, v in choice.items() if v} == {"fused_norm"}
    assert trials[0]["check"]["difference"] == pytest.approx(0.1) and trials[0]["kept"]
    assert trials[1]["kept"] and "error" not in trials[1]
    assert "gradients too far: p1's gradient differs" in trials[2]["error"]
    assert notes[0] == (
        "tune: the defaults: 1000.0 ms a step (gradients within 10% of fp32's, the most in p1)"
    )
    assert notes[1] == ("tune: +fused_norm: 800.0 ms a step, 1.25x the best so far (gradients "
                        "within 10% of fp32's, the most in p1)")  # fmt: skip


def test_a_default_step_whose_gradients_are_not_finite_fails_its_trial():
    """With NaN gradients at the run's precision the default step's distance from fp32 is NaN,
    which no trial could be held to: its trial fails, and training takes the defaults."""
    exact = gradients([1.0, 2.0])

    def measure(options: dict, check: bool) -> dict:
        nan = gradients([1.0, float("nan")])
        floor = tune.CHECK_FLOOR["bf16"]
        return {"seconds": 1.0, "exact": exact, "gradients": nan, "floor": floor}

    choice, trials = tune.choose(BASE, [[{"packed": True}]], measure, never)
    assert choice == BASE and len(trials) == 1
    assert trials[0]["error"] == "its gradients are not finite" and not trials[0]["kept"]


def test_the_check_sees_a_gradient_permuted_scaled_or_of_the_wrong_sign(tiny_bert_config):
    """`signature`s of the same gradients agree to the last bit; a permutation (same norm), a
    sign flip or a 10% scaling of one parameter's gradient does not pass, even with the bf16
    floor."""
    from bertforge.model import BertConfig, BertForPretraining

    torch.manual_seed(0)
    model = BertForPretraining(BertConfig.from_json(tiny_bert_config))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    want = tune.signature(model, 2.0)
    assert want["names"][1] == "word_embeddings.weight"
    same = tune.gradients_agree(tune.signature(model, 2.0), want, want, FLOOR)
    assert same == {"difference": 0.0, "difference_in": same["difference_in"], "norm": 0.0,
                    "norm_in": same["norm_in"], "loss": 0.0}  # fmt: skip
    weight = dict(model.named_parameters())["layers.0.attn_out.weight"]
    original = weight.grad.clone()
    bf16 = tune.CHECK_FLOOR["bf16"]
    # truly 1.41, 1.41 and 2 of the norm; the sketch estimates it within about a tenth
    for wrong in (original.t(), original.flip(0), -original):
        weight.grad = wrong.contiguous()
        check = tune.gradients_agree(tune.signature(model, 2.0), want, want, bf16)
        assert check["norm"] < 1e-6 and check["difference"] > 0.7, check
        assert check["error"].startswith("layers.0.attn_out.weight's gradient differs")
    weight.grad = original * 1.1
    check = tune.gradients_agree(tune.signature(model, 2.0), want, want, bf16)
    assert "layers.0.attn_out.weight's gradient norm" in check["error"]


def test_questions_leave_out_what_the_user_set_and_what_the_device_cannot_run():
    cfg = TrainConfig(data="d", output="o")
    asked = tune.questions(cfg, CPU, BASE)
    names = [sorted({k for change in q for k in change}) for q in asked]
    assert names == [["compile"], ["packed"], ["split_qkv"], ["flat_optimizer"]]  # no Triton
    fixed = TrainConfig(data="d", output="o", compile=False, split_qkv=True, optimizer="lamb")
    names = [sorted({k for c in q for k in c}) for q in tune.questions(fixed, CPU, BASE)]
    assert names == [["packed"]]


def test_questions_on_cuda_with_triton(monkeypatch):
    monkeypatch.setattr(tune.kernels, "available", lambda: True)
    cuda = torch.device("cuda")
    base = {**BASE, "compile": True, "packed": True}
    asked = tune.questions(TrainConfig(data="d", output="o"), cuda, base)
    assert asked == [
        [{"compile": False}],
        [{"packed": False}],
        [{"fused_attention": True, "packed": True}],
        [{"fused_ffn": True}, {"fused_gelu": True}],
        [{"fused_norm": True}],
        [{"split_qkv": True}],
        [{"flat_optimizer": True}],
        [{"cuda_graphs": True, "compile": True, "flat_optimizer": True}],
    ]
    # --fused-gelu asked for: no feed-forward question; --no-compile: no CUDA graphs
    cfg = TrainConfig(data="d", output="o", fused_gelu=True, compile=False)
    asked = tune.questions(cfg, cuda, base)
    assert [{"fused_ffn": True}] not in asked and not any("cuda_graphs" in q[0] for q in asked)
    # several processes: no CUDA graphs (a trial cannot time DDP's all-reduce in a replay)
    asked = tune.questions(TrainConfig(data="d", output="o"), cuda, base, processes=2)
    assert not any("cuda_graphs" in q[0] for q in asked) and [{"fused_norm": True}] in asked


def crash(trial, options, result):
    print("about to crash", flush=True)
    os._exit(7)


def hang(trial, options, result):
    if "TUNE_TEST_PID" in os.environ:
        Path(os.environ["TUNE_TEST_PID"]).write_text(str(os.getpid()))
    time.sleep(60)


def test_a_second_timing_does_not_check_the_gradients_again(monkeypatch):
    """`measure` in this process: the default step's trial brings its gradients' signature
    and, in bf16, fp32's; timed again (check=False), neither is computed."""
    import dataclasses

    from bertforge.train import trial_rows

    sizes = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 128}  # fmt: skip
    cfg = TrainConfig(data="d", output="o", precision="bf16", **BASE)
    trial = tune.Trial(cfg, sizes, "cpu", [trial_rows(4, 16, 3)], 4, 1, 1, 1)
    calls = []
    check = tune.check_gradients
    monkeypatch.setattr(tune, "check_gradients", lambda *a: calls.append(a) or check(*a))
    first = tune.measure(trial, dict(BASE))
    assert first["gradients"]["names"] and first["exact"]["names"] and len(calls) == 2
    calls.clear()
    again = tune.measure(dataclasses.replace(trial, check=False), dict(BASE))
    assert calls == [] and "gradients" not in again and "exact" not in again
    assert again["seconds"] > 0


def test_a_trial_that_dies_or_hangs_costs_that_trial_only():
    got = tune.run_trial(None, {}, target="tests.test_tune:crash")  # type: ignore[arg-type]
    assert got.pop("trial_s") > 0  # how long its process took
    assert got == {"error": "its process exited with code 7: about to crash"}
    start = time.perf_counter()
    got = tune.run_trial(None, {}, target="tests.test_tune:hang", timeout=3)  # type: ignore[arg-type]
    took = time.perf_counter() - start
    assert 3 <= got.pop("trial_s") <= round(took, 1) and took < 30  # trial_s: to 0.1 s
    assert got == {"error": "took longer than 3 s"}


def test_a_trial_that_raises_reports_its_cause():
    bad = tune.Trial(TrainConfig(data="d", output="o"), {"hidden_size": 0}, "cpu", [], 1, 1, 1, 1)
    got = tune.run_trial(bad, dict(BASE))
    assert set(got) == {"error", "trial_s"} and "not a BERT config" in got["error"], got


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tune"


def tuned_run(data: Path, bert: Path, out: Path, **extra) -> TrainConfig:
    settings = {"train_batch_size": 8, "num_train_steps": 2, "log_every": 1, "tune": True,
                "save_checkpoints_steps": 2, "eval_records": 0, "progress": False}  # fmt: skip
    return TrainConfig(data=str(data), output=str(out), bert_config=str(bert),
                       **{**settings, **extra})  # fmt: skip


def test_a_tuned_run_on_the_cpu(tmp_path, cache, train_data, tiny_bert_config, monkeypatch):
    """Every trial in its own process, the choice in the manifest, tune.json and the cache; a
    second run takes the cache's choice without measuring."""
    monkeypatch.setattr(tune, "WARMUP_STEPS", 1)
    monkeypatch.setattr(tune, "TIMED_STEPS", 1)
    cfg = tuned_run(train_data, tiny_bert_config, tmp_path / "run", compile=False)
    train(cfg)
    report = json.loads((tmp_path / "run" / "tune.json").read_text())
    tried = [t["options"] for t in report["trials"] if not t.get("again")]
    # one question at a time, on top of what was kept (which depends on the timings)
    assert tried[0] == {} and [list(t)[-1] for t in tried[1:]] == [
        "packed", "split_qkv", "flat_optimizer"]  # fmt: skip
    assert all(t[name] for t in tried[1:] for name in t)
    again = [t for t in report["trials"] if t.get("again")]  # after a change was kept
    if report["choice"]:
        assert [t["options"] for t in again] == [{}, report["choice"]]
        defaults = min(report["trials"][0]["seconds"], again[0]["seconds"])
        assert report["speedup"] == round(defaults / again[1]["seconds"], 4)
    else:  # none kept, or the one kept did not hold when timed again
        assert report["speedup"] == 1.0
        assert not again or (again[0]["options"] == {} and not again[1]["kept"])
    for trial in report["trials"]:
        assert "error" not in trial, trial
        assert trial["seconds"] == pytest.approx(sorted(trial["blocks"])[1], abs=1e-6)
        assert len(trial["blocks"]) == 3
        assert trial["seconds"] > 0 and trial["tokens_per_s"] > 0 and "gradients" not in trial
    # the default step's own distance from its gradients in fp32: bf16's rounding where the
    # trials' processes (not patched as this one is, conftest.py) train in bf16 (a CPU with
    # bf16 in hardware), none in fp32 (where it is the fp32 step); each trial's about as far
    bf16 = report["trials"][0]["floor"] == tune.CHECK_FLOOR["bf16"]
    own = report["trials"][0]["check"]
    assert (own["difference"] > 0) is bf16
    for trial in report["trials"][1:]:
        if not trial.get("again"):
            assert abs(trial["check"]["difference"] - own["difference"]) < 0.01, trial
            assert abs(trial["check"]["norm"] - own["norm"]) < 0.01, trial
    assert report["key"]["fixed"] == {"compile": False}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for name, on in report["choice"].items():
        assert manifest["config"][name] is on
    assert list(cache.iterdir()) == [Path(report["cache"])]

    def no_trials(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(tune, "run_trial", no_trials)
    train(tuned_run(train_data, tiny_bert_config, tmp_path / "again", compile=False))
    again = json.loads((tmp_path / "again" / "tune.json").read_text())
    assert again["choice"] == report["choice"] and again["when"] == report["when"]


def test_two_processes_take_process_0s_choice(tmp_path, cache, train_data, tiny_bert_config):
    """torchrun with 2 gloo processes and --tune: process 0 measures (its trials spawned
    beside both), the other waits; both train with the choice, the same losses as one process
    run with the choice's flags."""
    base = ["--data", str(train_data), "--bert-config", str(tiny_bert_config), "--no-progress",
            "--train-batch-size", "16", "--num-train-steps", "3", "--log-every", "1",
            "--no-do-eval", "--precision", "fp32", "--no-compile"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29519", "-m", "bertforge.cli", "train", *base, "--output",
           str(two), "--tune"]  # fmt: skip
    run_group(cmd, check=True, env=env, timeout=600)
    report = json.loads((two / "tune.json").read_text())
    assert report["key"]["micro_batch_size"] == 8 and report["key"]["processes"] == 2
    assert len([t for t in report["trials"] if not t.get("again")]) == 4
    flags = [f"--{'' if on else 'no-'}{name.replace('_', '-')}"
             for name, on in report["choice"].items()]  # fmt: skip
    one = tmp_path / "one"
    assert main(["train", *base, "--output", str(one), *flags]) == 0
    for x, y in zip(metrics(one), metrics(two), strict=True):
        for k in ("loss", "masked_lm_loss", "next_sentence_loss"):
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
    assert json.loads((two / "manifest.json").read_text())["processes"] == 2


def test_tune_is_on_by_default_for_long_gpu_runs_only():
    cuda = torch.device("cuda")
    long = TrainConfig(data="d", output="o", num_train_steps=tune.AUTO_TUNE_STEPS)
    assert tune.use_tune(long, cuda) and not tune.use_tune(long, CPU)
    short = TrainConfig(data="d", output="o", num_train_steps=tune.AUTO_TUNE_STEPS - 1)
    assert not tune.use_tune(short, cuda)
    assert tune.use_tune(TrainConfig(data="d", output="o", tune=True), CPU)
    assert not tune.use_tune(TrainConfig(data="d", output="o", tune=False,
                                         num_train_steps=10**6), cuda)  # fmt: skip


def test_out_of_memory_in_the_default_trial_halves_the_micro_batch(tmp_path, cache, capsys):
    """The default step out of memory at the run's micro-batch (a long GPU run whose batch does
    not fit): tune times at half, and half again, as the trainer will halve it; still out of
    memory at 1, it trains with the defaults."""
    from bertforge.model import BertConfig
    from bertforge.train import trial_rows

    sizes = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 128}  # fmt: skip
    bert = BertConfig.from_dict(sizes, "t")
    cfg = TrainConfig(data="d", output="o", tune=True)
    for start, fits in ((8, 2), (4, 0)):
        seen: list[int] = []

        def measure(trial, options, fits=fits, seen=seen):
            seen.append(trial.micro)
            if trial.micro > fits:
                return {"error": "CUDA out of memory. Tried to allocate 2.00 GiB"}
            return {"seconds": 1.0, "gradients": gradients([1.0]), "floor": FLOOR}

        out = tmp_path / str(start)
        out.mkdir()
        rows = [trial_rows(8, 32, 5)]
        choice, micro = tune.tune(cfg, bert, CPU, rows, start, 1, 1000, False, out, True, measure)
        assert choice == {} and micro == (fits or start)  # training starts where it fitted
        report = json.loads((out / "tune.json").read_text())
        assert report["key"]["micro_batch_size"] == start  # what the run asks for: its cache key
        err = capsys.readouterr().err
        if fits:
            assert seen[:3] == [8, 4, 2] and set(seen[2:]) == {2}
            assert report["micro_batch_size"] == 2 and "error" not in report["trials"][0]
            assert "tune: the default step ran out of memory at micro-batch 8; timing (and " in err
            assert "at micro-batch 4; timing (and then training) at 2" in err
        else:
            assert seen == [4, 2, 1] and "out of memory" in report["trials"][0]["error"]
            assert "the default step failed in its trial (CUDA out of memory" in err


def test_a_choice_made_under_another_check_rule_is_measured_again(cache, monkeypatch):
    """The check's rule is in the cache key: a choice cached before it changed (one that may
    have ruled out a good kernel) is not taken."""
    from bertforge.model import BertConfig
    from bertforge.train import trial_rows

    sizes = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 128}  # fmt: skip
    args = (TrainConfig(data="d", output="o"), BertConfig.from_dict(sizes, "t"), CPU,
            trial_rows(8, 32, 5), 8, 1, BASE)  # fmt: skip
    key = tune.tune_key(*args)
    assert key["check"] == {"against": "fp32", "rounding": 1.5, "floor": tune.CHECK_FLOOR,
                            "sketch": 256}  # fmt: skip
    assert tune.cache_file(tune.tune_key(*args)) == tune.cache_file(key)
    monkeypatch.setattr(tune, "ROUNDING", 2.0)
    assert tune.cache_file(tune.tune_key(*args)) != tune.cache_file(key)
    monkeypatch.setattr(tune, "ROUNDING", 1.5)
    monkeypatch.setitem(tune.CHECK_FLOOR, "bf16", {"norm": 0.03, "difference": 0.1})
    assert tune.cache_file(tune.tune_key(*args)) != tune.cache_file(key)
    monkeypatch.setitem(tune.CHECK_FLOOR, "bf16", {"norm": 0.02, "difference": 0.02})
    assert tune.cache_file(tune.tune_key(*args)) == tune.cache_file(key)
    monkeypatch.setattr(tune, "SKETCH_BUCKETS", 8)  # the gradients estimated otherwise
    assert tune.cache_file(tune.tune_key(*args)) != tune.cache_file(key)


def test_training_starts_at_the_micro_batch_the_trials_fitted(
    tmp_path, cache, train_data, tiny_bert_config, monkeypatch
):
    """The default trial out of memory at the run's micro-batch (8) and not at 4: the run
    trains at 4 from its first step, with no out-of-memory of its own to recover from."""
    seen = []

    def run_trial(trial, options):
        seen.append(trial.micro)
        if trial.micro > 4:
            return {"error": "out of memory"}
        return {"seconds": 1.0, "gradients": gradients([1.0]), "floor": FLOOR}

    monkeypatch.setattr(tune, "run_trial", run_trial)
    train(tuned_run(train_data, tiny_bert_config, tmp_path / "run", compile=False))
    assert seen[:2] == [8, 4] and set(seen[1:]) == {4}
    assert [r["micro_batch_size"] for r in metrics(tmp_path / "run")] == [4, 4]
    # resumed (its checkpoints hold micro-batch 4), it finds the choice in the cache
    seen.clear()
    train(tuned_run(train_data, tiny_bert_config, tmp_path / "run", compile=False,
                    num_train_steps=4))  # fmt: skip
    assert seen == [] and [r["micro_batch_size"] for r in metrics(tmp_path / "run")] == [4] * 4
    assert len(list(cache.iterdir())) == 2  # the choice under the run's micro-batch and 4


def test_a_cache_that_cannot_be_written_costs_a_warning(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache's folder would go")
    monkeypatch.setenv("BERTFORGE_CACHE", str(blocker))
    measure, _ = timed({frozenset({"split_qkv"}): 0.5})
    monkeypatch.setattr(tune, "run_trial", lambda trial, options: measure(options, trial.check))
    train(tuned_run(train_data, tiny_bert_config, tmp_path / "run", compile=False, progress=True))
    err = capsys.readouterr().err
    assert f"--tune could not cache its choice in {blocker}" in err and "BERTFORGE_CACHE" in err
    report = json.loads((tmp_path / "run" / "tune.json").read_text())
    assert report["choice"] == {"split_qkv": True}
    assert "on cpu, with --split-qkv\n" in err  # the first progress line
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]["split_qkv"]
    assert blocker.read_text().startswith("a file")
    # a fresh start in the same output without --tune leaves no record of the old choice
    train(tuned_run(train_data, tiny_bert_config, tmp_path / "run", tune=False, overwrite=True))
    assert not (tmp_path / "run" / "tune.json").exists()


def test_a_change_must_beat_the_best_in_every_block():
    assert tune.beats({"seconds": 0.9, "blocks": [0.85, 0.9, 0.95]}, 1.0)
    assert not tune.beats({"seconds": 0.9, "blocks": [0.85, 0.9, 1.05]}, 1.0)  # one slow block
    assert not tune.beats({"seconds": 0.99, "blocks": [0.99, 0.99, 0.99]}, 1.0)  # under MARGIN
    assert tune.beats({"seconds": 0.9}, 1.0)


def test_a_trial_does_not_import_the_callers_main_module(tmp_path):
    """A script without a __main__ guard can train with --tune: the trial process does not run
    it again (multiprocessing's spawn would, and fail)."""
    done = run_script(
        tmp_path / "unguarded.py",
        "from bertforge import tune\n"
        "print('the script ran', flush=True)\n"
        "print(tune.run_trial(None, {}, target='tests.test_tune:crash')['error'])\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "the script ran",
        "its process exited with code 7: about to crash",
    ]


def test_a_trial_does_not_import_from_the_working_directory(tmp_path):
    """A random.py or json.py where `bertforge train` runs (a user's scratch scripts) does not
    stand in for the standard library's in the trial processes (`python -m` would put the
    working directory first on their sys.path): they import what the caller imports."""
    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir()
    scripts.mkdir()
    for name in ("json", "random"):  # json: what a `python -c` program might import first
        (work / f"{name}.py").write_text(f"raise SystemExit('the working directory {name}.py')\n")
    script = scripts / "caller.py"  # its own directory first on sys.path, as a console script's
    script.write_text(
        "from bertforge import tune\n"
        "print(tune.run_trial(None, {}, target='tests.test_tune:crash')['error'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "its process exited with code 7: about to crash\n"


def test_an_interrupted_tuning_leaves_no_trial_running(tmp_path):
    """Ctrl-C while a trial runs: the trial process is killed with the one waiting for it."""
    pid_file = tmp_path / "pid"
    done = run_script(
        tmp_path / "interrupted.py",
        "import os, signal, threading, time\n"
        "from pathlib import Path\n"
        "from bertforge import tune\n"
        f"os.environ['TUNE_TEST_PID'] = {str(pid_file)!r}\n"
        "def interrupt():\n"
        f"    while not Path({str(pid_file)!r}).exists():\n"
        "        time.sleep(0.1)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "threading.Thread(target=interrupt, daemon=True).start()\n"
        "try:\n"
        "    tune.run_trial(None, {}, target='tests.test_tune:hang')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n",
    )
    assert done.stdout == "interrupted\n", done.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_nothing_to_time_when_every_option_is_set(tmp_path, cache, train_data, tiny_bert_config,
                                                  monkeypatch, capsys):  # fmt: skip
    def no_trials(*a, **k):
        raise AssertionError("measured")

    monkeypatch.setattr(tune, "run_trial", no_trials)
    fixed = {"compile": False, "packed": False, "split_qkv": False, "flat_optimizer": False}
    train(tuned_run(train_data, tiny_bert_config, tmp_path / "run", progress=True, **fixed))
    assert "tune: every speed option this device runs is set" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tune.json").exists() and not cache.exists()
