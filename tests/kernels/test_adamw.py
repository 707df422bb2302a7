"""`kernels.adamw_` against torch's fused AdamW (`torch._fused_adamw_`, the update it follows):
one buffer, with and without gradient scaling and weight decay, early and late steps, a
skipped step; FlatAdamW with it against FlatAdamW with torch's kernel; the sm_90 compile.
Needs Triton; how it runs on a CPU: tests/kernels/test_fused_norm.py's docstring."""

from __future__ import annotations

import copy

import pytest
import torch

triton = pytest.importorskip("triton")

from bertforge import kernels  # noqa: E402
from bertforge.model import BertConfig, BertForPretraining  # noqa: E402
from bertforge.optim import FlatAdamW, param_groups  # noqa: E402
from tests.kernels.common import (  # noqa: E402
    ADAMW_CONSTANTS,
    ADAMW_SIGNATURE,
    DEVICE,
    compile_one_for_sm90,
    compiled,
    numeric,
)

N = 2 * kernels.ADAMW_BLOCK + 77  # a last program with a partial block


def buffers(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p, grad, m = (torch.randn(N, generator=g) for _ in range(3))
    v = torch.rand(N, generator=g) * 1e-2
    return [t.to(DEVICE) for t in (p, grad, m, v)]


@numeric
@pytest.mark.parametrize("step", [1.0, 3000.0])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torchs_fused_adamw(step, scaled, weight_decay):
    ours, want = buffers(0), buffers(0)
    scale = torch.tensor(3.5, device=DEVICE) if scaled else None
    settings = {"lr": 1e-3, "weight_decay": weight_decay, "eps": 1e-6}
    kernels.adamw_(*ours, torch.tensor([step], device=DEVICE), betas=(0.9, 0.999),
                   grad_scale=scale, **settings)  # fmt: skip
    torch._fused_adamw_(*[[t] for t in want], [], [torch.tensor(step, device=DEVICE)],
                        beta1=0.9, beta2=0.999, amsgrad=False, maximize=False,
                        grad_scale=scale, **settings)  # fmt: skip
    before = buffers(0)
    names = ("param", "grad", "exp_avg", "exp_avg_sq")
    for name, a, b, old in zip(names, ours, want, before, strict=True):
        if name == "grad":  # read, never written (torch's kernel stores it unscaled)
            assert torch.equal(a, old)
            continue
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=name)
        assert not torch.equal(a, old), name


@numeric
def test_a_found_inf_step_moves_nothing():
    ours, before = buffers(1), buffers(1)
    kernels.adamw_(*ours, torch.tensor([5.0], device=DEVICE), lr=1e-3, betas=(0.9, 0.999),
                   weight_decay=0.01, eps=1e-6,
                   found_inf=torch.tensor(1.0, device=DEVICE))  # fmt: skip
    for a, b in zip(ours, before, strict=True):
        assert torch.equal(a, b)
    kernels.adamw_(*ours, torch.tensor([5.0], device=DEVICE), lr=1e-3, betas=(0.9, 0.999),
                   weight_decay=0.01, eps=1e-6,
                   found_inf=torch.tensor(0.0, device=DEVICE))  # fmt: skip
    assert not torch.equal(ours[0], before[0])


@numeric
def test_flat_adamw_takes_the_kernel(monkeypatch):
    """FlatAdamW with kernels.adamw_ (called: counted) against FlatAdamW with torch's fused
    kernel over the same buffers: four steps of the same gradients, one of them skipped."""
    calls = []
    real = kernels.adamw_
    monkeypatch.setattr(kernels, "adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37)  # fmt: skip
    models = [BertForPretraining(config).to(DEVICE)]
    models.append(copy.deepcopy(models[0]))
    opts = [FlatAdamW(param_groups(m, 0.1), lr=1e-2, eps=1e-6) for m in models]
    opts[1].triton = False
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in models[0].parameters()]
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad.copy_(g)
            opt.grad_scale = torch.tensor(1.7, device=DEVICE)  # type: ignore[attr-defined]
            opt.found_inf = torch.tensor(float(step == 2), device=DEVICE)  # type: ignore[attr-defined]
            opt.step()
    assert len(calls) == 4 * len(opts[0].param_groups)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)
    for a, b in zip(opts[0].flat, opts[1].flat, strict=True):
        assert torch.equal(a.steps, b.steps) and float(a.steps[0]) == 3
        torch.testing.assert_close(a.exp_avg_sq, b.exp_avg_sq, rtol=2e-6, atol=1e-12)


@compiled
def test_compiles_for_sm90():
    for constants in ADAMW_CONSTANTS:
        compile_one_for_sm90(kernels._adamw_kernel, ADAMW_SIGNATURE, constants, kernels.ADAMW_WARPS)
