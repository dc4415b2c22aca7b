"""FusedRDBD: Regrettable Delta-Bar-Delta."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import ArgumentTypeError, as_float, check_bool, check_range, check_sgd_arguments
from autolr_fused.controllers import rdbd
from autolr_fused.optim.base import AutoLROptimizer, lr_tensor
from autolr_fused.optim.sgd import sgd_group_directions

BASES = ("sgd", "adam")


class FusedRDBD(AutoLROptimizer):
    """Regrettable Delta-Bar-Delta (paper: rdbd.txt, Algorithm 1).

    Every tensor has its own lr (``optimizer.state[p]["lr"]``, a 0-dim float32
    tensor starting at its group's ``lr``), moved by ``meta_lr`` (eta) times the
    inner product of consecutive update directions, and a change that the next
    inner product shows was biased (the sign flipped) is regretted: undone on the
    lr and on the parameters. See ``autolr_fused.controllers.rdbd``.

    ``base="sgd"`` takes torch.optim.SGD's arguments (``momentum``,
    ``dampening``, ``weight_decay``, ``nesterov``); ``base="adam"`` takes
    torch.optim.Adam's (``betas``, ``eps``, ``weight_decay``, and
    ``decoupled_weight_decay`` for AdamW). ``regret=False`` is plain
    delta-bar-delta. ``lr_bounds=(low, high)`` clamps every lr (None: unbounded).

    Defaults: ``lr=0.005`` (alpha_0), ``meta_lr=0.01`` (eta), as in the paper's
    SGD runs; its Adam runs use ``betas=(0.05, 0.99)`` and ``meta_lr=5e-7``.

    Extra memory per parameter: the previous direction (1 x parameter size),
    plus the momentum buffer (SGD with momentum) or the two moments (Adam).
    """

    _global_keys = ("base",)
    _float32_state_keys = ("lr", "prev_h", "prev_delta")

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.005,
        meta_lr: float = 0.01,
        base: str = "sgd",
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decoupled_weight_decay: bool = False,
        regret: bool = True,
        lr_bounds: tuple[float | None, float | None] = (0.0, None),
        *,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            meta_lr=meta_lr,
            base=base,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
            decoupled_weight_decay=decoupled_weight_decay,
            regret=regret,
            lr_bounds=lr_bounds,
            maximize=maximize,
        )
        super().__init__(params, defaults, backend)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_sgd_arguments(group)  # lr, momentum, dampening, weight_decay, nesterov, maximize
        check_range("meta_lr", group["meta_lr"], 0.0)
        if not isinstance(group["base"], str):
            raise ArgumentTypeError(f"base must be a string, got {type(group['base']).__name__}")
        if group["base"] not in BASES:
            raise ValueError(f"unknown base={group['base']!r}; choose one of {BASES}")
        if group["base"] == "adam" and (group["momentum"] != 0 or group["nesterov"]):
            raise ValueError("momentum and nesterov apply to base='sgd'; base='adam' uses betas")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ArgumentTypeError(f"betas must be a pair of floats, got {betas!r}")
        check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_bool("regret", group["regret"])
        bounds = group["lr_bounds"]
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ArgumentTypeError(f"lr_bounds must be a pair (low, high), each a float or None, got {bounds!r}")
        low, high = (None if b is None else as_float("lr_bounds", b) for b in bounds)
        if low is not None and high is not None and low > high:
            raise ValueError(f"lr_bounds=(low, high) needs low <= high, got {bounds!r}")

    # --------------------------------------------------------------------- step
    def _directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        if group["base"] == "sgd":
            return sgd_group_directions(self, group, params)[1]
        states = [self.state[p] for p in params]
        for p, s in zip(params, states):
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["step"] = 0
            s["step"] += 1
        beta1, beta2 = group["betas"]
        return self._ops.adam_directions(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )

    def _step(self) -> None:
        ops, device = self._ops, self._device()
        params, directions, segments = [], [], []  # segments: (group, first index, end index)
        for group in self.param_groups:
            group_params = self._grad_params(group)
            if not group_params:
                continue
            for p in group_params:
                state = self.state[p]
                if "lr" not in state:
                    state["lr"] = lr_tensor(group["lr"], p.device)
                    state["prev_h"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["prev_delta"] = torch.zeros((), dtype=torch.float32, device=p.device)
            segments.append((group, len(params), len(params) + len(group_params)))
            params += group_params
            directions += self._directions(group, group_params)
        if not params:
            return
        states = [self.state[p] for p in params]
        zero = torch.zeros((), dtype=torch.float32, device=device)
        h_per_tensor = [zero] * len(params)  # h_1 = 0
        with_prev = [i for i, s in enumerate(states) if "prev_direction" in s]
        if with_prev:
            dots = ops.dots(
                [directions[i] for i in with_prev], [states[i]["prev_direction"] for i in with_prev], device
            )
            for i, value in zip(with_prev, dots.unbind(0)):
                h_per_tensor[i] = value
        h = torch.stack(h_per_tensor)

        def stacked(key: str) -> Tensor:
            return torch.stack([s[key].to(device) for s in states])

        prev_h, prev_delta, old_lr = stacked("prev_h"), stacked("prev_delta"), stacked("lr")
        parts = [
            rdbd.update(
                h[start:end],
                prev_h[start:end],
                prev_delta[start:end],
                old_lr[start:end],
                meta_lr=float(group["meta_lr"]),
                low=None if group["lr_bounds"][0] is None else float(group["lr_bounds"][0]),
                high=None if group["lr_bounds"][1] is None else float(group["lr_bounds"][1]),
                regret=bool(group["regret"]),
            )
            for group, start, end in segments
        ]
        result = rdbd.RDBDUpdate(*(torch.cat(field) for field in zip(*(vars(u).values() for u in parts))))
        for i in with_prev:  # undo a regretted lr change on the parameters (adds 0 where none fired)
            params[i].addcmul_(states[i]["prev_direction"], result.regret_delta[i].to(params[i].device))
        for s, new_lr, delta, h_i in zip(states, result.lr.unbind(0), result.delta.unbind(0), result.h.unbind(0)):
            s["lr"].copy_(new_lr)
            s["prev_delta"].copy_(delta)
            s["prev_h"].copy_(h_i)
        lrs = [s["lr"] for s in states]
        for group, start, end in segments:
            if group["base"] == "adam" and group["decoupled_weight_decay"] and group["weight_decay"] != 0:
                ops.decay_(params[start:end], lrs[start:end], group["weight_decay"])
        ops.apply_update(params, directions, lrs)
        prev = [s.get("prev_direction") for s in states]
        ops.copy_into(prev, directions)
        for s, d in zip(states, prev):
            s["prev_direction"] = d

    def stats(self) -> dict[str, float]:
        lrs = [self.state[p]["lr"] for p in self._all_params() if "lr" in self.state[p]]
        if not lrs:
            return {**super().stats(), "inner_product": 0.0}
        h = torch.stack(
            [self.state[p]["prev_h"].to(lrs[0].device) for p in self._all_params() if "lr" in self.state[p]]
        )
        return {**self._lr_summary(lrs), "inner_product": h.double().sum().item()}
