"""Adam for CPU training, step for step the same arithmetic as ``torch.optim.Adam``.

Why not ``torch.optim.Adam`` itself: constructing it (``add_param_group``), ``zero_grad`` and
``step`` each go through ``torch._disable_dynamo`` or ``torch._dynamo.graph_break()``, which
import ``torch._dynamo`` (and sympy behind it) on first use: 1.3 CPU-seconds and 72 MB in every
daemon and worker process that trains, for a compiler we never call.

On CPU ``torch.optim.Adam`` runs its single-tensor path (``_single_tensor_adam``; its multi-tensor
"foreach" kernels are for CUDA and similar devices), with ``amsgrad``, ``maximize``,
``capturable``, ``differentiable`` and decoupled weight decay all off. :class:`Adam` performs
that path's tensor operations in the same order, so parameters and moments come out bit-identical
(``tests/ml/test_adam.py`` checks it against the installed torch), and its ``state_dict()`` has the
layout of ``torch.optim.Adam``'s, so either can load the other's state. Training on other devices
keeps ``torch.optim.Adam`` (see :func:`p2pfl.ml.train.fit`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["Adam"]


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay)`` for CPU tensors, no dynamo."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        self.param_groups: list[dict[str, Any]] = [
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                # The remaining keys of torch.optim.Adam's group, fixed at its defaults: a
                # state_dict saved here loads into torch.optim.Adam and means the same there.
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "decoupled_weight_decay": False,
            }
        ]
        # Per parameter, created at its first step: step count (a float32 scalar, as torch keeps
        # it), first and second moment.
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        eps, weight_decay = group["eps"], group["weight_decay"]
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            state = self.state.get(index)
            if state is None:
                state = self.state[index] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
            step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            grad = param.grad
            step_t += 1
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()  # a float, as in torch: beta ** step below is float ** float
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...]}``, as ``torch.optim.Adam`` gives.

        Like torch's, it holds the live moment tensors (not copies).
        """
        group = {**self.param_groups[0], "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the moments and hyper-parameters of a state saved by this class or torch's Adam."""
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state is for {len(group['params'])} parameters, "
                f"the model has {len(self.params)}"
            )
        for key in ("amsgrad", "maximize", "capturable", "differentiable", "fused"):
            if group.get(key):
                raise ValueError(f"optimizer state uses Adam option {key!r}, not supported here")
        if group.get("decoupled_weight_decay"):
            raise ValueError("optimizer state uses decoupled weight decay (AdamW), not supported")
        self.param_groups = [{k: v for k, v in group.items() if k != "params"}]
        self.state = {}
        for position, saved in state_dict["state"].items():
            index = group["params"].index(position)
            param = self.params[index]
            self.state[index] = {
                "step": saved["step"]
                if torch.is_tensor(saved["step"])
                else torch.tensor(float(saved["step"]), dtype=torch.float32),
                "exp_avg": saved["exp_avg"].to(dtype=param.dtype, device=param.device),
                "exp_avg_sq": saved["exp_avg_sq"].to(dtype=param.dtype, device=param.device),
            }
