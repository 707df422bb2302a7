"""The Triton kernels (`bertforge.kernels`): tests/kernels/ run in the Triton environment that
`make test` builds (BERTFORGE_TRITON_PYTHON: torch's CPU build with Triton), once under
Triton's interpreter (the kernels' numbers on CPU tensors) and once without it (what
torch.compile traces). Here, in the main environment, what happens without Triton."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch

from bertforge import kernels
from bertforge.cli import main
from bertforge.errors import UserError
from bertforge.model import BertConfig, Layer
from bertforge.train import check_fused, check_fused_attention, check_fused_ffn
from tests.conftest import ROOT
from tests.test_train import args as train_args

TRITON_PYTHON = os.environ.get("BERTFORGE_TRITON_PYTHON")


def counts(output: str) -> dict[str, int]:
    """pytest's summary line as {"passed": n, "skipped": m, ...}."""
    return {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)
    }


MODES = {"interpreted": True, "traced": False}


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    """Both modes' pytest runs, started together (each is mostly one thread: on two cores the
    pair takes about as long as the slower one alone), as {mode: (process, its output files)}."""
    if not TRITON_PYTHON:
        pytest.skip("needs BERTFORGE_TRITON_PYTHON (make test sets it up)")
    folder = tmp_path_factory.mktemp("kernels")
    runs = {}
    for mode, interpret in MODES.items():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        out, err = folder / f"{mode}.out", folder / f"{mode}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            command = [TRITON_PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
            runs[mode] = (
                subprocess.Popen(
                    [*command, "tests/kernels"],
                    cwd=ROOT,
                    env=env,
                    stdout=stdout,
                    stderr=stderr,
                ),
                (out, err),
            )
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("mode", MODES)
def test_kernel_tests_pass_in_the_triton_environment(kernel_runs, mode):
    interpret = MODES[mode]
    process, (out, err) = kernel_runs[mode]
    returncode = process.wait(timeout=600)
    output = out.read_text()
    assert returncode == 0, output[-4000:] + err.read_text()[-2000:]
    summary = counts(output.splitlines()[-1])
    assert summary.get("passed", 0) >= (8 if interpret else 3), summary
    # every test left out is left out for the mode it is not run in, none for a missing piece
    skips = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", output, re.M)
    assert sum(int(n) for n, _ in skips) == summary.get("skipped", 0), output[-2000:]
    expected = "interpret" if interpret else "needs CUDA or TRITON_INTERPRET=1"
    assert all(expected in reason for _, reason in skips), skips


@pytest.mark.skipif(kernels.available(), reason="Triton is installed here")
def test_without_triton_the_layer_keeps_its_plain_path():
    assert not kernels.usable(torch.zeros(1))
    c = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    layer = Layer(c).eval()
    x = torch.randn(2, 5, 32)
    plain = layer(x, None)
    layer.fused_norm = layer.fused_gelu = layer.fused_ffn = True
    torch.testing.assert_close(layer(x, None), plain, rtol=0, atol=0)


def test_fused_flags_need_cuda_with_triton():
    for flag in ("--fused-norm", "--fused-gelu", "--fused-ffn", "--fused-attention"):
        with pytest.raises(UserError, match=f"{flag} needs a CUDA device with Triton"):
            check_fused(flag, torch.device("cpu"))


def test_an_older_triton_or_torch_than_the_kernels_take_leaves_them_unused(monkeypatch):
    """torch 2.4's Triton 3.0 lacks what the kernels use, and torch 2.10 fails to compile them:
    they are not used (bertforge imports and trains with torch's kernels), and a --fused-*
    flag's error says why."""
    assert kernels.release("3.0.0") < kernels.MIN_TRITON <= kernels.release("3.6.0+git1a2b")
    assert kernels.release("3.10.1") > kernels.MIN_TRITON
    monkeypatch.setattr(kernels, "OLD_TRITON", "3.0.0")
    assert not kernels.available()
    with pytest.raises(UserError) as e:
        check_fused("--fused-norm", torch.device("cuda"))
    assert str(e.value) == (
        "--fused-norm needs a CUDA device with Triton (Triton 3.0.0 is older than 3.6, the "
        "oldest bertforge's kernels take); leave the flag out to train with torch's own kernels."
    )
    # torch 2.10's Triton is new enough, but its AOT autograd fails on the kernels' graphs
    monkeypatch.setattr(kernels, "OLD_TRITON", None)
    monkeypatch.setattr(kernels, "triton", object())  # installed, as on a GPU machine
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    monkeypatch.setattr(kernels, "TORCH_RELEASE", (2, 10))
    assert (
        kernels.missing()
        == "torch 2.10.0+cu128 is older than 2.11, the oldest they are tested with"
    )
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(kernels, "TORCH_RELEASE", (2, 11))
    assert kernels.missing() is None and kernels.available()


def test_fused_ffn_is_refused_for_a_hidden_size_its_kernels_do_not_take():
    check_fused_ffn(BertConfig(vocab_size=64, hidden_size=128, num_attention_heads=2))
    odd = BertConfig(vocab_size=64, hidden_size=96, num_attention_heads=2)
    with pytest.raises(
        UserError,
        match="--fused-ffn takes hidden sizes that are a multiple of 64; this model's is 96",
    ):
        check_fused_ffn(odd)


def test_fused_attention_is_refused_where_its_kernels_would_not_run():
    """Packed batches of sequences up to 128 tokens, head sizes 16-128, or one error naming
    what is not so (a run that silently kept flash attention would be timed as if it had)."""
    base = BertConfig(vocab_size=64, hidden_size=128, num_attention_heads=2)  # head 64
    check_fused_attention(base, 128, packed=True)
    odd = BertConfig(vocab_size=64, hidden_size=96, num_attention_heads=2)  # head 48
    for bert, seq, packed, why in (
        (base, 128, False, "--no-packed pads them"),
        (base, 512, False, "the data's max_seq_length is 512"),  # then padded by default
        (odd, 128, True, "this model's head size is 48"),
    ):
        with pytest.raises(UserError, match="--fused-attention takes packed batches") as e:
            check_fused_attention(bert, seq, packed)
        assert why in str(e.value) and "16/32/64/128" in str(e.value)


def test_train_with_fused_norm_on_a_cpu_stops_before_writing(
    tmp_path, train_data, tiny_bert_config, capsys
):
    out = tmp_path / "run"
    rc = main(
        train_args(train_data, out, tiny_bert_config, "--num-train-steps", "2", "--fused-norm")
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "--fused-norm needs a CUDA device with Triton (training is on cpu)" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--fused-gelu", "--fused-ffn"])
def test_fused_gelu_is_refused_for_another_activation(
    tmp_path, train_data, tiny_bert_config, capsys, flag
):
    config = json.loads(tiny_bert_config.read_text())
    (tmp_path / "bert_config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    out = tmp_path / "run"
    bert = tmp_path / "bert_config.json"
    rc = main(train_args(train_data, out, bert, "--num-train-steps", "2", flag))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{flag} computes GELU's erf form" in err and "hidden_act is gelu_new" in err
    assert not out.exists()


def test_train_sets_fused_attention_on_every_layer(
    tmp_path, train_data, tiny_bert_config, monkeypatch
):
    """The trainer hands --fused-attention to every layer's attention (on a CUDA machine;
    stood in for here by letting the flag pass the device check: without Triton the layer
    then keeps its plain packed path)."""
    import bertforge.model as model_module
    import bertforge.train as train_module

    monkeypatch.setattr(train_module, "check_fused", lambda flag, device: None)
    fused = []
    attend = model_module.attend

    def spy(q, k, v, layout, dropout, fused_attention=False):  # type: ignore[no-untyped-def]
        if isinstance(layout, model_module.Packed):
            fused.append(fused_attention)
        return attend(q, k, v, layout, dropout, fused_attention)

    monkeypatch.setattr(model_module, "attend", spy)
    out = tmp_path / "run"
    argv = train_args(train_data, out, tiny_bert_config, "--num-train-steps", "2", "--packed")
    assert main([*argv, "--fused-attention"]) == 0
    assert fused and set(fused) == {True}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["fused_attention"] is True and manifest["packed"] is True
