"""FlatAdamW against torch's fused AdamW: the same updates, state dicts that pass between the
two, gradients that stay in its buffer."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from bertforge.model import BertConfig, BertForPretraining
from bertforge.optim import FlatAdamW, param_groups, set_moments


def tiny_model() -> BertForPretraining:
    torch.manual_seed(0)  # odd widths: parameters that do not fill FlatAdamW.ALIGN
    config = BertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37)  # fmt: skip
    return BertForPretraining(config)


def pair() -> tuple[torch.nn.Module, torch.optim.AdamW, torch.nn.Module, FlatAdamW]:
    plain = tiny_model()
    flat = copy.deepcopy(plain)
    opt = torch.optim.AdamW(param_groups(plain, 0.1), lr=1e-2, eps=1e-6, fused=True)
    return plain, opt, flat, FlatAdamW(param_groups(flat, 0.1), lr=1e-2, eps=1e-6)


def steps(models: list[torch.nn.Module], opts: list[torch.optim.Optimizer], seed: int,
          bad: tuple[int, ...] = ()) -> None:  # fmt: skip
    """Four updates with the same random gradients for every model (scaled by 1.7, as clipping
    does; the steps in `bad` skipped through found_inf)."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad(set_to_none=True)
            for p, g in zip(model.parameters(), grads, strict=True):
                if isinstance(opt, FlatAdamW):
                    p.grad.copy_(g)  # the buffer's view, as backward fills it
                else:
                    p.grad = g.clone()
            opt.grad_scale = torch.tensor(1.7)  # type: ignore[attr-defined]
            opt.found_inf = torch.tensor(float(step in bad))  # type: ignore[attr-defined]
            opt.step()
            del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]


def assert_same(a: torch.nn.Module, b: torch.nn.Module, oa: torch.optim.Optimizer,
                ob: torch.optim.Optimizer) -> None:  # fmt: skip
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, state in sa["state"].items():
        assert state.keys() == sb["state"][i].keys()
        for key, value in state.items():
            torch.testing.assert_close(value, sb["state"][i][key], rtol=1e-6, atol=1e-9)


def test_updates_are_adamws():
    plain, opt, flat, flat_opt = pair()
    before = [p.detach().clone() for p in plain.parameters()]
    steps([plain, flat], [opt, flat_opt], seed=1, bad=(2,))
    assert_same(plain, flat, opt, flat_opt)
    assert float(flat_opt.state_dict()["state"][0]["step"]) == 3  # the skipped step not counted
    for p, q in zip(flat.parameters(), before, strict=True):
        assert not torch.equal(p.detach(), q)
    # The parameters are the model's own and live in the buffers.
    groups = flat_opt.param_groups
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in flat.parameters()}
    for group, f in zip(groups, flat_opt.flat, strict=True):
        for p in group["params"]:
            start = p.data_ptr() - f.data.data_ptr()
            assert 0 <= start < f.data.numel() * 4 and start % (4 * FlatAdamW.ALIGN) == 0
            assert p.untyped_storage().data_ptr() == p.data_ptr()  # a storage of its own


def test_state_dicts_pass_both_ways():
    plain, opt, flat, flat_opt = pair()
    steps([plain, flat], [opt, flat_opt], seed=1)
    # FlatAdamW's state dict into torch's AdamW, and torch's into a new FlatAdamW, then both on.
    plain2, flat2 = copy.deepcopy(flat), copy.deepcopy(plain)
    opt2 = torch.optim.AdamW(param_groups(plain2, 0.1), lr=1e-2, eps=1e-6, fused=True)
    opt2.load_state_dict(copy.deepcopy(flat_opt.state_dict()))  # as torch.save + load
    flat_opt2 = FlatAdamW(param_groups(flat2, 0.1), lr=1e-2, eps=1e-6)
    flat_opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(f.uniform for f in flat_opt2.flat)
    steps([plain, flat, plain2, flat2], [opt, flat_opt, opt2, flat_opt2], seed=2)
    assert_same(plain, plain2, opt, opt2)
    assert_same(plain, flat2, opt, flat_opt2)
    # Loading put the state into the buffers: the optimizer's state is views of them.
    for group, f in zip(flat_opt2.param_groups, flat_opt2.flat, strict=True):
        for i, p in enumerate(group["params"]):
            state = flat_opt2.state[p]
            assert state["exp_avg"].data_ptr() == f.view(f.exp_avg, i, p).data_ptr()
            assert state["step"].data_ptr() == f.steps[i].data_ptr()


def test_a_fresh_torch_adamw_state_dict_loads():
    """torch's AdamW has no state before its first step: loading that starts from zero."""
    plain, opt, flat, flat_opt = pair()
    steps([flat], [flat_opt], seed=1)
    flat_opt.load_state_dict(opt.state_dict())
    assert not any(f.steps.any() or f.exp_avg.any() for f in flat_opt.flat)
    with torch.no_grad():
        for p, q in zip(plain.parameters(), flat.parameters(), strict=True):
            q.copy_(p)
    steps([plain, flat], [opt, flat_opt], seed=2)
    assert_same(plain, flat, opt, flat_opt)


def test_moments_for_some_parameters_only():
    """Moments taken over for some parameters (set_moments: a checkpoint without the others):
    step counts differ within a group, and each parameter is updated with its own, as AdamW."""
    plain, opt, flat, flat_opt = pair()
    names = [n for n, _ in plain.named_parameters()][::3]
    gen = torch.Generator().manual_seed(3)
    moments = {}
    for name, p in plain.named_parameters():
        if name in names:
            moments[name] = (
                torch.randn(p.shape, generator=gen),
                torch.rand(p.shape, generator=gen),
            )
    set_moments(opt, plain, moments, step=7)
    set_moments(flat_opt, flat, moments, step=7)
    assert not any(f.uniform for f in flat_opt.flat)
    steps([plain, flat], [opt, flat_opt], seed=4, bad=(1,))
    assert_same(plain, flat, opt, flat_opt)


def backward(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (2, 9), generator=gen)
    mlm, nsp = model(ids, torch.zeros_like(ids), None, torch.randint(0, 9, (2, 3), generator=gen))
    (mlm.square().mean() + nsp.square().mean()).backward()


def test_backward_accumulates_into_the_buffer():
    model = tiny_model()
    model.eval()  # no dropout: the reference below must see the same function
    flat_opt = FlatAdamW(param_groups(model, 0.1), lr=1e-2)
    for seed in (1, 2):  # two micro-batches: the second adds to the first
        backward(model, seed)
    grads = [p.grad.clone() for p in model.parameters()]
    total = sum(f.grad.abs().sum() for f in flat_opt.flat)
    assert float(total) > 0 and float(total) == pytest.approx(
        float(sum(g.abs().sum() for g in grads)), rel=1e-5
    )
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.grad = None
    for seed in (1, 2):
        backward(reference, seed)
    for g, q in zip(grads, reference.parameters(), strict=True):
        torch.testing.assert_close(g, q.grad)
    flat_opt.zero_grad(set_to_none=True)  # zeroes the buffer, keeps the views
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert not any(f.grad.any() for f in flat_opt.flat)
    next(model.parameters()).grad = None  # a gradient set aside would be left out of the update
    with pytest.raises(RuntimeError, match="zero_grad"):
        flat_opt.step()
    flat_opt.zero_grad()
    flat_opt.step()


def test_the_layers_compile_as_regions():
    """Each parameter has a storage of its own over the buffer: torch.compile's nested regions
    (the trainer's compiled layers) refuse inputs that share one. Same gradients as eager."""
    from bertforge.train import compile_step

    model = tiny_model()
    model.eval()
    reference = copy.deepcopy(model)
    flat_opt = FlatAdamW(param_groups(model, 0.1), lr=1e-2)
    assert model.compile_regions
    compiled = compile_step(model, fullgraph=True)  # a refused region raises, not falls back
    backward(compiled, seed=1)
    backward(reference, seed=1)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert sum(float(f.grad.abs().sum()) for f in flat_opt.flat) > 0


def test_parameters_outlive_the_optimizer():
    """The buffer's memory stays the parameters' after the optimizer is gone."""
    model = tiny_model()
    opt = FlatAdamW(param_groups(model, 0.1), lr=1e-2)
    sizes = [f.data.numel() for f in opt.flat]
    values = [p.detach().clone() for p in model.parameters()]
    del opt
    gc.collect()
    reuse = [torch.full((n,), 7.0) for n in sizes for _ in range(4)]  # would take freed memory
    for p, v in zip(model.parameters(), values, strict=True):
        assert torch.equal(p.detach(), v)
    assert reuse


def test_grad_scaler_steps_it_as_adamw():
    """fp16 loss scaling (GradScaler: unscale, skip a step whose gradients overflowed, step)
    moves FlatAdamW as it moves torch's fused AdamW."""
    plain, opt, flat, flat_opt = pair()
    plain.eval(), flat.eval()  # no dropout: both models compute the same gradients
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(4):
        for model, o, scaler in zip((plain, flat), (opt, flat_opt), scalers, strict=True):
            o.zero_grad(set_to_none=True)
            gen = torch.Generator().manual_seed(step)
            ids = torch.randint(0, 99, (2, 9), generator=gen)
            positions = torch.randint(0, 9, (2, 3), generator=gen)
            mlm, nsp = model(ids, torch.zeros_like(ids), None, positions)
            scaler.scale(mlm.square().mean() + nsp.square().mean()).backward()
            if step == 1:  # an overflow: the step is skipped and the scale halved
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    assert float(flat_opt.state_dict()["state"][0]["step"]) == 3
    assert_same(plain, flat, opt, flat_opt)


def test_an_empty_group_is_left_alone():
    """A group without parameters (a model without biases, say) builds, steps and loads."""
    model = torch.nn.Linear(4, 3, bias=False)
    opt = FlatAdamW(param_groups(model, 0.1), lr=1e-2)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 0]
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.zero_grad()
    opt.step()
