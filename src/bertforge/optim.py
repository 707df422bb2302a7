"""Optimizers and the learning-rate schedule of BERT pretraining.

AdamW is torch's (fused on CUDA). Written here because torch has no equivalent:
- `GoogleAdamW`: Google's AdamWeightDecayOptimizer (no bias correction; decoupled weight
  decay added to the update before the learning rate), for runs that must follow Google's
  recipe step for step;
- `Lamb` (You et al. 2019): Adam's update with decay, scaled per tensor by the trust ratio
  |w| / |update|, which keeps large-batch training stable.
Both use torch's multi-tensor (_foreach) kernels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


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
        optimizer.state[p] = {"step": count, "exp_avg": m, "exp_avg_sq": v}
