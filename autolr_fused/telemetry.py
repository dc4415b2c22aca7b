"""Logging ``stats()`` every N steps to TensorBoard and to Python ``logging``.

``stats()`` reads device values back to the host, so it synchronises with the
device; the optimizers' steps do not (AutoDrop's epoch ends aside). A
:class:`StatsLogger` calls ``stats()`` only on every ``every``-th step, so the
other steps keep running without a synchronisation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from autolr_fused._validation import ArgumentTypeError, check_bool, check_int
from autolr_fused.optim.base import AutoLROptimizer

DEFAULT_LOGGER = "autolr_fused"


class ScalarWriter(Protocol):
    """What :class:`StatsLogger` needs of a writer: ``torch.utils.tensorboard.SummaryWriter.add_scalar``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...


class StatsLogger:
    """Write an optimizer's ``stats()`` every ``every`` steps to a TensorBoard writer and/or a logger.

    Call :meth:`step` after every ``optimizer.step()`` (or :meth:`attach` once, to
    have a step post-hook call it). On every ``every``-th call it reads
    ``optimizer.stats()`` (one synchronisation) and writes each value as a scalar
    ``"<prefix>/<key>"`` at ``global_step`` = the number of steps so far to
    ``writer`` (a ``torch.utils.tensorboard.SummaryWriter`` or anything with its
    ``add_scalar``), and one line ``"<prefix> step <n>: key=value ..."`` at ``level``
    to ``logger``. With neither given it logs to the ``"autolr_fused"`` logger.
    The other calls only count: they read nothing from the device.

    ``per_tensor=True`` adds the per-tensor entries of ``stats(per_tensor=True)``
    (``lr/<i>``, and AutoDrop's ``angle/<i>``); ``names`` (a module, or
    ``(name, parameter)`` pairs such as ``model.named_parameters()``) puts the
    parameter's name in place of its index ``i``. Any object with a ``stats()``
    method works (an :class:`AALR` controller: call :meth:`step` once per epoch),
    but ``per_tensor`` and :meth:`attach` need an autolr_fused optimizer and a
    ``torch.optim.Optimizer`` respectively. When resuming, set :attr:`steps` to the
    number of steps already taken so that the logged steps continue.
    """

    def __init__(
        self,
        optimizer: Any,
        every: int = 100,
        writer: ScalarWriter | None = None,
        logger: logging.Logger | None = None,
        names: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] | None = None,
        per_tensor: bool = False,
        *,
        prefix: str = "optimizer",
        level: int = logging.INFO,
    ) -> None:
        if not callable(getattr(optimizer, "stats", None)):
            raise ArgumentTypeError(f"optimizer must have a stats() method, got {type(optimizer).__name__}")
        check_int("every", every, 1)
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ArgumentTypeError(
                f"writer must have an add_scalar method (a SummaryWriter), got {type(writer).__name__}"
            )
        if logger is not None and not isinstance(logger, logging.Logger):
            raise ArgumentTypeError(f"logger must be a logging.Logger, got {type(logger).__name__}")
        check_bool("per_tensor", per_tensor)
        if per_tensor and not isinstance(optimizer, AutoLROptimizer):
            raise ArgumentTypeError(f"per_tensor=True needs an autolr_fused optimizer, got {type(optimizer).__name__}")
        if not isinstance(prefix, str):
            raise ArgumentTypeError(f"prefix must be a string, got {type(prefix).__name__}")
        check_int("level", level, 0)
        self.optimizer = optimizer
        self.every = every
        self.writer = writer
        self.logger = logger if logger is not None or writer is not None else logging.getLogger(DEFAULT_LOGGER)
        self.per_tensor = per_tensor
        self.prefix = prefix
        self.level = level
        self._names = _names_by_id(names)
        self.steps = 0  # calls of step() so far: the global step of what is written

    def step(self) -> dict[str, float] | None:
        """Count one optimizer step; on every ``every``-th, write and return the stats (else None)."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.write()

    def write(self) -> dict[str, float]:
        """Read the stats now (this synchronises) and write them at the current step count."""
        stats = self.optimizer.stats(per_tensor=True) if self.per_tensor else self.optimizer.stats()
        stats = self._with_names(stats)
        if self.writer is not None:
            for key, value in stats.items():
                self.writer.add_scalar(f"{self.prefix}/{key}", float(value), self.steps)
        if self.logger is not None and self.logger.isEnabledFor(self.level):
            line = " ".join(f"{key}={float(value):.6g}" for key, value in stats.items())
            self.logger.log(self.level, "%s step %d: %s", self.prefix, self.steps, line)
        return stats

    def attach(self) -> RemovableHandle:
        """Call :meth:`step` after every ``optimizer.step()`` (a step post-hook); returns the hook's handle."""
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                f"attach() needs a torch.optim.Optimizer, got {type(self.optimizer).__name__}; call step() instead"
            )
        return self.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.step())

    def _with_names(self, stats: dict[str, float]) -> dict[str, float]:
        """``"lr/<i>"`` -> ``"lr/<name>"`` for the parameters that have a name."""
        if not self._names or not self.per_tensor:
            return stats
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        out = {}
        for key, value in stats.items():
            head, _, index = key.rpartition("/")
            if head and index.isdigit() and int(index) < len(params):
                index = self._names.get(id(params[int(index)]), index)
                key = f"{head}/{index}"
            out[key] = value
        return out


def _names_by_id(names: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] | None) -> dict[int, str]:
    if names is None:
        return {}
    if isinstance(names, nn.Module):
        pairs = names.named_parameters()
    elif isinstance(names, Mapping):
        pairs = names.items()
    elif isinstance(names, Iterable) and not isinstance(names, (str, bytes)):
        pairs = names
    else:
        raise ArgumentTypeError(
            f"names must be a module, a mapping or (name, parameter) pairs, got {type(names).__name__}"
        )
    out = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ArgumentTypeError(f"names must give (name, parameter) pairs, got an item {pair!r}")
        out[id(pair[1])] = pair[0]
    return out
