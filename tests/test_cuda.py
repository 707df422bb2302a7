"""The CUDA paths (bf16/fp16, packed varlen attention, compile, out-of-memory recovery).

Skipped without a GPU; run on one, the results are recorded in bench/RESULTS.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from bertforge.batches import Rows
from bertforge.cli import main
from bertforge.config import TrainConfig
from bertforge.distributed import Dist
from bertforge.model import BertConfig, BertForPretraining
from bertforge.optim import FlatAdamW, param_groups
from bertforge.train import (
    Objective,
    fit_micro_batch,
    make_optimizer,
    model_batch,
    objective_args,
    peak_flops,
    trial_rows,
    trial_step,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fused", [False, True], ids=["flash", "fused-attention"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_matches_padded_on_cuda(dtype, fused):
    """The loader's packed batch through flash varlen attention, or `kernels.attention`, gives
    the padded logits, with the last layer pruned (the default: SDPA's padded attention of
    the heads' rows) and whole."""
    from bertforge import kernels

    if fused and not kernels.available():
        pytest.skip("needs Triton")
    c = BertConfig.preset("mini", 1000)
    model = BertForPretraining(c).cuda().eval()
    model.set_layer_options(fused_attention=fused)
    g = np.random.default_rng(0)
    lengths = np.array([128, 100, 64, 9, 128, 77, 120, 33])
    ids = g.integers(5, 1000, (8, 128))
    ids[np.arange(128)[None] >= lengths[:, None]] = 0
    positions = g.integers(1, 8, (8, 5))
    rows = Rows(ids, lengths, None, np.zeros_like(ids), np.zeros(8, dtype=np.int64),
                positions, np.ones_like(positions))  # fmt: skip
    outs = []
    for packed in (False, True):
        for prune in (False, True):
            model.prune_last_layer = prune
            b, lengths_arg, layout = model_batch(rows, torch.device("cuda"), packed)
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                outs.append(model(b["input_ids"], b["token_type_ids"], lengths_arg,
                                  b["positions"], layout))  # fmt: skip
    for other in outs[1:]:
        for x, y in zip(outs[0], other, strict=True):
            torch.testing.assert_close(x.float(), y.float(), atol=0.05, rtol=0.05)


def train_mini(data, out, *extra):
    """120 steps of BERT-mini; returns the training log's windows (eval lines left out)."""
    rc = main(["train", "--data", str(data), "--output", str(out), "--model-size", "mini",
               "--train-batch-size", "32", "--num-train-steps", "120", "--learning-rate", "1e-3",
               "--log-every", "10", "--save-checkpoints-steps", "60", *extra])  # fmt: skip
    assert rc == 0
    return [r for r in metrics(out) if not r.get("eval")]


def late_loss(windows):
    return float(np.mean([r["loss"] for r in windows[-3:]]))


@pytest.fixture(scope="module")
def cpu_windows(tmp_path_factory, train_data):
    """The same run in fp32 on the CPU: what the CUDA runs must learn as well as."""
    return train_mini(train_data, tmp_path_factory.mktemp("cpu") / "run", "--device", "cpu")


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--no-packed"],
        ["--compile"],
        ["--no-packed", "--compile"],
        ["--precision", "fp16"],
        ["--compile", "--flat-optimizer"],
        ["--precision", "fp16", "--flat-optimizer"],
        ["--cuda-graphs"],  # with the flat optimizer it brings
        ["--cuda-graphs", "--flat-optimizer", "--micro-batch-size", "8", "--no-packed"],
        [
            "--compile",
            "--split-qkv",
            "--fused-norm",
            "--fused-gelu",
            "--fused-attention",
            "--flat-optimizer",
        ],
        ["--compile", "--fused-norm", "--fused-ffn", "--fused-attention"],
        ["--precision", "fp32", "--fused-attention"],  # packed, where flash varlen is not
    ],
)
def test_train_on_cuda(tmp_path, train_data, cpu_windows, extra):
    """Each CUDA path (packed, the default at this length, and padded; compiled; fp16 with
    loss scaling; the flat optimizer, its update bertforge's Triton kernel or, without Triton,
    torch's; CUDA graphs, packed and in padded micro-batches; every speed option together:
    q/k/v split, bertforge's Triton kernels, attention's included, the flat optimizer; the
    feed-forward's GELU in Triton matmuls' epilogues; bertforge's attention in fp32, where
    flash varlen does not run) learns as the fp32 CPU
    run of the same data, masks and seed does: its loss over the last 30 steps within 0.15
    of the CPU run's (three seeds spread by 0.08; a path that stops learning stays near the
    first window's loss, about 1 higher)."""
    out = tmp_path / "run"
    m = train_mini(train_data, out, *extra)
    losses = [round(r["loss"], 3) for r in m]
    assert m[-1]["loss"] < m[0]["loss"] - 0.8, losses
    assert abs(late_loss(m) - late_loss(cpu_windows)) < 0.15, (losses, late_loss(cpu_windows))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cuda"
    precision = next((p for p in ("fp16", "fp32") if p in extra), "bf16")
    assert manifest["precision"] == precision
    assert manifest["packed"] is ("--no-packed" not in extra)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16  # fp32: no peak known
    known = peak_flops(torch.device("cuda"), dtype) is not None
    mfu = [r.get("mfu") for r in m]
    assert all(0 < x < 1 for x in mfu) if known else mfu == [None] * len(m), mfu


def test_tune_on_cuda(tmp_path, train_data, cpu_windows, monkeypatch):
    """--tune on the GPU, uncompiled (test_train_on_cuda runs the options compiled): every
    option it can ask about runs in its trial (bertforge's Triton kernels among them, where
    Triton is installed) and gives the default step's gradients without dropout; the run
    then learns with the choice as the CPU run does."""
    from bertforge import kernels, tune

    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune, "WARMUP_STEPS", 2)
    monkeypatch.setattr(tune, "TIMED_STEPS", 2)
    out = tmp_path / "run"
    m = train_mini(train_data, out, "--tune", "--no-compile")
    report = json.loads((out / "tune.json").read_text())
    for trial in report["trials"]:
        assert "error" not in trial, trial
    asked = {name for trial in report["trials"] for name in trial["options"]}
    expected = {"split_qkv", "flat_optimizer"}
    if kernels.available():
        expected |= {"fused_attention", "fused_ffn", "fused_gelu", "fused_norm"}
    assert expected <= asked, asked
    assert abs(late_loss(m) - late_loss(cpu_windows)) < 0.15
    manifest = json.loads((out / "manifest.json").read_text())
    for name, on in report["choice"].items():
        assert manifest["config"][name] is on


def test_out_of_memory_halves_the_micro_batch(tmp_path, train_data, capsys):
    # BERT-large at 4096 x 64 tokens needs far more than a GPU's memory for activations.
    out = tmp_path / "oom"
    rc = main(
        [
            "train",
            "--data",
            str(train_data),
            "--output",
            str(out),
            "--model-size",
            "large",
            "--train-batch-size",
            "4096",
            "--num-train-steps",
            "2",
            "--log-every",
            "1",
            "--no-do-eval",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "CUDA out of memory at step 0 with micro-batch 4096" in err
    m = metrics(out)
    assert m[-1]["micro_batch_size"] < 4096 and len(m) == 2


def test_trial_steps_find_the_micro_batch_that_fits_and_give_the_memory_back(capsys):
    """What a multi-process run does before its first step, with real out-of-memory errors:
    BERT-large at 4096 x 512 tokens does not fit; halving finds a size that does, and every
    failed trial gives its memory back (what stays allocated is the model, and cuBLAS's
    workspaces)."""
    device = torch.device("cuda")
    model = BertForPretraining(BertConfig.preset("large", 30522)).to(device)
    optimizer = make_optimizer(TrainConfig(data="d", output="o"), model)
    weights = torch.cuda.memory_allocated(device)
    d = Dist(0, 1, 0, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    step_args = (autocast, torch.amp.GradScaler("cuda", enabled=False), False, False)

    def trial(n: int) -> None:
        trial_step(Objective(model), None, model, optimizer, trial_rows(n, 512, 80), d, step_args)

    micro = fit_micro_batch(4096, d, trial)
    assert 1 <= micro < 4096
    assert "micro-batch 4096 does not fit in memory on process(es) 0" in capsys.readouterr().err
    assert torch.cuda.memory_allocated(device) - weights < 2**28  # cuBLAS's workspaces at most
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    trial(micro)  # fits again: nothing was left behind by the failed trials


def packed_rows(n: int, seed: int) -> Rows:
    g = np.random.default_rng(seed)
    lengths = g.integers(20, 129, n)
    ids = g.integers(5, 1000, (n, 128))
    ids[np.arange(128)[None] >= lengths[:, None]] = 0
    positions = np.stack([g.choice(np.arange(1, int(k)), 8, replace=False) for k in lengths])
    return Rows(ids, lengths, None, np.zeros_like(ids), g.integers(0, 2, n), positions,
                g.integers(5, 1000, positions.shape))  # fmt: skip


@pytest.mark.parametrize("flat", [False, True], ids=["one-batch", "flat-two-micro-batches"])
def test_cuda_graphs_with_filler_give_the_compiled_steps_gradients(flat):
    """What `bench/train_throughput.py --graphs` measures: the compiled step under CUDA graphs
    (mode reduce-overhead), packed batches rounded up by filler to a few token counts, gives
    the plain compiled step's losses and gradients (dropout off; bf16). flat: two
    micro-batches a step accumulated into FlatAdamW's gradient buffer, in place, where
    pytorch#169545 saw a replay overwrite a gradient that a graph's output had become."""
    device = torch.device("cuda")
    c = BertConfig.preset("mini", 1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPretraining(c).to(device)
    opt = FlatAdamW(param_groups(model, 0.01), lr=1e-3) if flat else None
    results = []
    for graphs in (False, True):
        counters.clear()
        forward = torch.compile(Objective(model), mode="reduce-overhead" if graphs else None)
        for seed in range(4):  # warm-up, recording and replays over two token counts
            (opt or model).zero_grad(set_to_none=True)
            for micro in range(2 if flat else 1):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                rows = packed_rows(16, (seed + micro) % 2)
                b, lengths, layout = model_batch(rows, device, True, False, 512 if graphs else 0)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    mlm, nsp, _ = forward(*objective_args(b, lengths, layout))
                (mlm + nsp).backward()
                loss = float(mlm + nsp)
        results.append((loss, {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    assert counters["inductor"]["cudagraph_skips"] == 0  # the graphs did run
    (want, want_grads), (got, grads) = results
    assert got == pytest.approx(want, rel=1e-2)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, atol=2e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["inductor", "fused-kernels"])
def test_dropout_draws_anew_at_every_graph_replay(fused):
    """Under CUDA graphs (mode reduce-overhead) a replay draws new dropout masks, as the step
    without graphs does: the same batch's loss differs from replay to replay with dropout on
    (inductor's and flash attention's, or `kernels.fused_norm`'s and `kernels.attention`'s
    seeds) and is the same with it off, so a graph that froze its random numbers would fail
    here (the train tests would still see a model learn)."""
    from bertforge import kernels

    if fused and not kernels.available():
        pytest.skip("needs Triton")
    device = torch.device("cuda")
    losses = {}
    for p in (0.1, 0.0):
        c = BertConfig.preset("mini", 1000, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
        torch.manual_seed(0)
        model = BertForPretraining(c).to(device)
        model.set_layer_options(fused_norm=fused, fused_gelu=fused, fused_attention=fused)
        counters.clear()
        forward = torch.compile(Objective(model), mode="reduce-overhead")
        rows = packed_rows(16, 0)
        got = []
        for _ in range(5):  # warm-up, recording, replays
            torch.compiler.cudagraph_mark_step_begin()
            b, lengths, layout = model_batch(rows, device, True, False, 512)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                mlm, nsp, _ = forward(*objective_args(b, lengths, layout))
            (mlm + nsp).backward()
            got.append(float(mlm + nsp))
        assert counters["inductor"]["cudagraph_skips"] == 0
        losses[p] = got[2:]
    assert len(set(losses[0.1])) == 3, losses  # every replay its own masks
    assert len(set(losses[0.0])) == 1, losses


def test_embed_on_cuda_in_bf16_is_within_its_rounding_of_fp32(tmp_path, exported_model, capsys):
    """`embed --device cuda`: `--precision auto` is bf16 (fp16 on a GPU without it), the
    summary says so, and its vectors are within that rounding of fp32's on the same GPU."""
    from bertforge.config import EmbedConfig
    from bertforge.embed import embed

    src = tmp_path / "in.txt"
    src.write_text("In the beginning God created the heaven and the earth.\nJesus wept.\n")
    vectors = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / f"{precision}.npy"
        embed(EmbedConfig(model=str(exported_model), input=str(src), output=str(out),
                          device="cuda", precision=precision))  # fmt: skip
        vectors[precision] = np.load(out)
    half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert f"({half} on cuda)" in capsys.readouterr().err
    a, b = vectors["fp32"], vectors["auto"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert not np.array_equal(a, b) and cosine.min() > 0.999
