"""Optimizers and the learning-rate schedule of BERT pretraining.

AdamW is torch's (fused on CUDA). Written here because torch has no equivalent:
- `GoogleAdamW`: Google's AdamWeightDecayOptimizer (no bias correction; decoupled weight
  decay added to the update before the learning rate), for runs that must follow Google's
  recipe step for step;
- `Lamb` (You et al. 2019): Adam's update with decay, scaled per tensor by the trust ratio
  |w| / |update|, which keeps large-batch training stable;
  both with torch's multi-tensor (_foreach) kernels;
- `FlatAdamW` (--flat-optimizer): AdamW with every parameter, gradient and moment of a group
  laid end to end in one buffer, so that an update is one call per group over one tensor
  instead of one per parameter: on CUDA bertforge's Triton kernel (`kernels.adamw_`, one
  launch over the whole buffer), elsewhere torch's fused kernel. torch's multi-tensor
  launcher splits each tensor into 64k-element chunks and runs at most 320 of them a launch,
  and its host side groups the two hundred tensors anew every step. The state and state dict
  are AdamW's, tensor for tensor, so checkpoints pass between the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from bertforge import kernels


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: not on LayerNorm, biases (Google's exclusion)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.dim() < 2 or "norm" in name or name.endswith("bias")
        (no_decay if plain else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Google's schedule: linear warmup from 0, then linear decay to 0 at `total` steps."""
    if warmup > 0 and step < warmup:
        return base * step / warmup
    return base * max(0.0, 1.0 - step / total)


@dataclass
class Flat:
    """One parameter group end to end: weights, gradients and both moments, each parameter at
    a multiple of FlatAdamW.ALIGN elements (the gaps zero), and the parameters' step counts."""

    data: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: torch.Tensor  # one per parameter: AdamW's state keeps a step count each
    starts: list[int]  # each parameter's first element in the buffers
    grads: list[torch.Tensor]  # the parameters' .grad, views of `grad`
    uniform: bool = True  # every step count the same: one call over the whole group

    def view(self, buffer: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
        return buffer[self.starts[i] : self.starts[i] + like.numel()].view_as(like)

    def recount(self) -> None:
        """Whether the step counts agree, after some were set (reads them from the device)."""
        self.uniform = not len(self.steps) or bool((self.steps == self.steps[0]).all())


# Each FlatAdamW parameter's buffer, kept alive by the parameter (its storage does not own it)
_BUFFER_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """The elements of `view` (contiguous) as a tensor with a storage of its own over the same
    memory, which it does not own (keep the buffer alive beside it). torch.compile's nested
    regions refuse inputs that share a storage, even where they never overlap, so parameters
    that were plain views of one buffer could not be compiled layer by layer."""
    size = view.numel() * view.element_size()
    storage = torch._C._construct_storage_from_data_pointer(view.data_ptr(), view.device, size)
    out = torch.empty(0, dtype=view.dtype, device=view.device)
    return out.set_(storage, 0, view.shape, view.stride())  # type: ignore[call-overload]


class FlatAdamW(torch.optim.AdamW):
    """AdamW over one buffer per parameter group (module docstring).

    Building it moves each parameter's values into its group's buffer (`p.data` is then its
    place there, with a storage of its own: `own_storage`) and gives each parameter a gradient
    that is a view of the group's gradient buffer, which backward accumulates into in place;
    `zero_grad` zeroes the buffer and keeps the views (`set_to_none` is ignored: a gradient
    set to None would fall out of the buffer). Each parameter's state (step, exp_avg,
    exp_avg_sq) is a view of the group's, so `state_dict` and `load_state_dict` are AdamW's.
    Parameters whose step counts differ (moments taken over for some parameters only) are
    updated one tensor each, as AdamW does."""

    ALIGN = 64  # elements: every parameter starts 256 bytes into the buffer in fp32
    triton = True  # on CUDA with Triton, kernels.adamw_ (one launch a group); else torch's

    def __init__(self, params: Iterable[Any], lr: float, **adamw: Any) -> None:
        """adamw: torch.optim.AdamW's betas, eps, weight_decay (its fused kernel's settings)."""
        super().__init__(params, lr=lr, fused=True, **adamw)
        self.flat = [self._lay_out(group["params"]) for group in self.param_groups]

    def _lay_out(self, params: list[torch.Tensor]) -> Flat:
        if not params:  # an empty group: nothing to lay out or update
            nothing = torch.zeros(0)
            return Flat(nothing, nothing, nothing, nothing, nothing, [], [])
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("FlatAdamW: a parameter group's tensors must share dtype and device")
        starts = [0]
        for p in params:
            starts.append(starts[-1] + -(-p.numel() // self.ALIGN) * self.ALIGN)
        total = starts.pop()
        data, grad, exp_avg, exp_avg_sq = (
            torch.zeros(total, dtype=first.dtype, device=first.device) for _ in range(4)
        )
        steps = torch.zeros(len(params), dtype=torch.float32, device=first.device)
        f = Flat(data, grad, exp_avg, exp_avg_sq, steps, starts, [])
        with torch.no_grad():
            for i, p in enumerate(params):
                f.view(data, i, p).copy_(p)
                p.data = own_storage(f.view(data, i, p))
                _BUFFER_OF[p] = data  # the memory lives as long as the parameter
                if p.grad is not None:
                    f.view(grad, i, p).copy_(p.grad)
                f.grads.append(f.view(grad, i, p))
                p.grad = f.grads[-1]
                self.adopt(f, i, p, {})
        return f

    def adopt(self, f: Flat, i: int, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Copy `state` (AdamW's for p; empty: a fresh start) into p's place in the buffers and
        make p's state the views of it."""
        own = {
            "step": f.steps[i],
            "exp_avg": f.view(f.exp_avg, i, p),
            "exp_avg_sq": f.view(f.exp_avg_sq, i, p),
        }
        for key, mine in own.items():
            if key in state:
                mine.copy_(state[key])
            else:
                mine.zero_()
        self.state[p] = own

    def set_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Give one parameter AdamW's state (moments and a step count taken over)."""
        for group, f in zip(self.param_groups, self.flat, strict=True):
            for i, q in enumerate(group["params"]):
                if q is p:
                    with torch.no_grad():
                        self.adopt(f, i, p, state)
                    f.recount()
                    return
        raise KeyError("FlatAdamW.set_state: not one of this optimizer's parameters")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """AdamW's state dict (this class's or torch.optim.AdamW's) copied into the buffers."""
        super().load_state_dict(state_dict)
        loaded = dict(self.state)
        with torch.no_grad():
            for group, f in zip(self.param_groups, self.flat, strict=True):
                for i, p in enumerate(group["params"]):
                    self.adopt(f, i, p, loaded.get(p, {}))
                f.recount()

    def flat_grads(self) -> list[torch.Tensor]:
        """The gradient buffers, one per group (the gaps are zero: norms over them are the
        parameters' norms)."""
        return [f.grad for f in self.flat]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group, f in zip(self.param_groups, self.flat, strict=True):
            f.grad.zero_()
            for p, g in zip(group["params"], f.grads, strict=True):
                if p.grad is not g:
                    p.grad = g

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """AdamW's update; reads `grad_scale` and `found_inf` set on the optimizer as torch's
        fused AdamW does (GradScaler's protocol: the gradients are divided by grad_scale, and
        nothing moves where found_inf is 1)."""
        if closure is not None:
            raise ValueError("FlatAdamW.step takes no closure")
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, f in zip(self.param_groups, self.flat, strict=True):
            params = group["params"]
            if not params:
                continue
            if any(p.grad is not g for p, g in zip(params, f.grads, strict=True)):
                raise RuntimeError(
                    "FlatAdamW: a parameter's .grad was replaced; set gradients to zero with "
                    "the optimizer's zero_grad, which keeps them in its buffer"
                )
            beta1, beta2 = group["betas"]
            settings = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
            settings.update(eps=group["eps"], grad_scale=grad_scale, found_inf=found_inf)
            f.steps.add_(1)  # the kernels read the counts with this step in
            if f.uniform and self.triton and kernels.usable(f.data):
                kernels.adamw_(f.data, f.grad, f.exp_avg, f.exp_avg_sq, f.steps,
                               betas=(beta1, beta2), **settings)  # fmt: skip
            elif f.uniform:
                torch._fused_adamw_([f.data], [f.grad], [f.exp_avg], [f.exp_avg_sq], [],
                                    [f.steps[0]], beta1=beta1, beta2=beta2, amsgrad=False,
                                    maximize=False, **settings)  # fmt: skip
            else:
                moments = [[self.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq")]
                steps = [self.state[p]["step"] for p in params]
                torch._fused_adamw_(params, f.grads, *moments, [], steps, beta1=beta1,
                                    beta2=beta2, amsgrad=False, maximize=False,
                                    **settings)  # fmt: skip
            if found_inf is not None:  # a skipped step is not counted
                f.steps.sub_(found_inf)


class _Moments(torch.optim.Optimizer):
    """Shared state handling: first and second moments per parameter."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def _moments(self, group: dict[str, Any]) -> tuple[list, list, list, list]:
        params, grads, ms, vs = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
        b1, b2 = group["betas"]
        if params:
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        return params, grads, ms, vs


class GoogleAdamW(_Moments):
    """update = m / (sqrt(v) + eps) + weight_decay * p;  p -= lr * update (no bias correction)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params, _, ms, vs = self._moments(group)
            if not params:
                continue
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(ms, denom)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            torch._foreach_add_(params, update, alpha=-group["lr"])


class Lamb(_Moments):
    """LAMB with bias correction; trust ratio |p| / |update| per tensor (1 where either is 0)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params, _, ms, vs = self._moments(group)
            if not params:
                continue
            b1, b2 = group["betas"]
            t = self.state[params[0]]["step"]
            m_hat = torch._foreach_div(ms, 1 - b1**t)
            denom = torch._foreach_div(vs, 1 - b2**t)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m_hat, denom)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            w_norm = torch._foreach_norm(params)
            u_norm = torch._foreach_norm(update)
            for p, u, wn, un in zip(params, update, w_norm, u_norm, strict=True):
                ratio = torch.where((wn > 0) & (un > 0), wn / un, torch.ones_like(wn))
                p.add_(u * ratio, alpha=-group["lr"])


def set_moments(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
    step: int,
) -> None:
    """Give the optimizer another trainer's Adam state: each parameter's first and second
    moments and the step count (Google's AdamWeightDecayOptimizer keeps the same m and v).
    A parameter without moments (a head the other trainer did not have) starts fresh."""
    for name, p in model.named_parameters():
        if name not in moments:
            continue
        m, v = (t.to(device=p.device, dtype=p.dtype).clone() for t in moments[name])
        count: Any = step
        if isinstance(optimizer, torch.optim.AdamW):  # torch keeps the step as a tensor
            fused = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
            count = torch.tensor(float(step), device=p.device if fused else "cpu")
        state = {"step": count, "exp_avg": m, "exp_avg_sq": v}
        if isinstance(optimizer, FlatAdamW):
            optimizer.set_state(p, state)
        else:
            optimizer.state[p] = state
