"""Hypergradient SGD as Baydin et al. (2018) publish it, as a benchmark yardstick.

performance.md asks for "hypergradient SGD as its authors published it" next to the
package's methods. The authors' reference optimizer is not on PyPI, so this module
implements their published algorithm (SGD-HD, with momentum SGDN-HD) the way their
reference code organises it: every step gathers all gradients into one flat vector,
takes one dot product with the previous step's flat update direction, adds
``hypergrad_lr * h`` to the lr, and scatters the update back tensor by tensor. It is a
yardstick for speed only (the package's tested implementation is ``FusedSGDHD``).

    h_t = <g_t, u_{t-1}>,  lr_t = lr_{t-1} + beta * h_t,  theta_t = theta_{t-1} - lr_t * u_t

where u_t is the SGD direction (the momentum buffer with momentum). The lr stays a
0-dim tensor, so a step reads nothing back to the host.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class FlatVectorSGDHD(torch.optim.Optimizer):
    """SGD-HD / SGDN-HD over one flat gradient vector (one param group)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, hypergrad_lr: float = 1e-6):
        super().__init__(params, dict(lr=lr, momentum=momentum, hypergrad_lr=hypergrad_lr))
        if len(self.param_groups) != 1:
            raise ValueError("FlatVectorSGDHD takes one parameter group")

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        state = self.state["flat"]  # one state for the whole flat vector
        if "lr" not in state:
            state["lr"] = torch.tensor(float(group["lr"]), device=grad.device)
        lr = state["lr"]
        if "prev_direction" in state:
            lr.add_(torch.dot(grad, state["prev_direction"]), alpha=group["hypergrad_lr"])
        if group["momentum"]:
            buffer = state.get("momentum_buffer")
            direction = grad if buffer is None else buffer.mul_(group["momentum"]).add_(grad)
            state["momentum_buffer"] = direction
        else:
            direction = grad
        state["prev_direction"] = direction  # read by the next step's dot before its buffer update
        offset = 0
        for p in params:
            n = p.numel()
            p.sub_(direction[offset : offset + n].view_as(p) * lr)
            offset += n
