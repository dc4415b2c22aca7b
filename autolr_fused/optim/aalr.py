"""AALR: the automated adaptive learning rate controller (paper: aalr.txt, Algorithm 1)."""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from autolr_fused._validation import ArgumentTypeError, check_int, check_range


class AALRDecision(NamedTuple):
    """What :meth:`AALR.epoch_end` decided: the lr for the next epoch, and whether it restored a checkpoint."""

    lr: float
    restored: bool


def _is_nan(loss: float) -> bool:
    """The paper's "NaN": any loss that is not finite."""
    return not math.isfinite(loss)


class AALR:
    """An epoch-level lr controller around any model and torch optimizer (aalr.txt, Algorithm 1).

    Call :meth:`epoch_end` after every training epoch with that epoch's loss; it
    sets the lr of every param group for the next epoch and returns it.

    Phase 1 runs ``patience`` epochs at ``initial_lr``: a NaN/inf loss or a loss
    above the best so far (L*) halves the lr and restarts from the initial model
    and optimizer state (checkpoint C0). After ``patience`` good epochs it saves
    a checkpoint C, doubles the lr and enters phase 2, which alternates waits of
    p epochs: an improvement saves C, doubles the lr and resets p to 1; a NaN
    halves the lr, restores C and doubles p; no improvement after a second wait
    halves the lr and doubles p. ``initial_loss`` is L*'s starting value (+inf
    when None). Checkpoints are deep copies of the model's and the optimizer's
    state dicts, kept in memory. Under ``torch.distributed`` the loss is averaged
    over ranks first, so every rank decides alike.

    Defaults: ``initial_lr=0.1``, ``patience=10``, from the paper.
    Extra memory: two copies of the model and optimizer state (C0 and C).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        initial_lr: float = 0.1,
        patience: int = 10,
        initial_loss: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        initial_lr = check_range("initial_lr", initial_lr, 0.0, low_open=True)
        check_int("patience", patience, 1)
        if initial_loss is not None:
            if isinstance(initial_loss, bool) or not isinstance(initial_loss, (int, float, Tensor)):
                raise ArgumentTypeError(f"initial_loss must be a number or None, got {type(initial_loss).__name__}")
            initial_loss = float(initial_loss)
            if math.isnan(initial_loss):
                raise ValueError("initial_loss must not be NaN")
        self.model = model
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.patience = patience
        self.initial_loss = math.inf if initial_loss is None else initial_loss
        self.lr = initial_lr
        self.phase = 1
        self.best_loss = self.initial_loss  # L*
        self.good_epochs = 0  # i, phase 1
        self.wait_length = 1  # p, phase 2
        self.second_wait = False
        self.epochs_into_wait = 0
        self.epochs = 0
        self.restores = 0
        self._set_lr()
        self._initial_checkpoint = self._snapshot()  # C0
        self._checkpoint: dict[str, Any] | None = None  # C

    # ------------------------------------------------------------ checkpoints
    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))
        self.restores += 1

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(self.lr)
            else:
                group["lr"] = self.lr

    def _global_loss(self, loss: float | Tensor) -> float:
        if isinstance(loss, Tensor):
            loss = loss.detach()
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
            loss = loss.reshape(()).double()
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise ArgumentTypeError(f"loss must be a number or a 1-element tensor, got {type(loss).__name__}")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            total = torch.as_tensor(loss, dtype=torch.float64).reshape(1).to(device)
            dist.all_reduce(total)
            return total.item() / dist.get_world_size()
        return float(loss)

    # ------------------------------------------------------------------ epochs
    def epoch_end(self, loss: float | Tensor) -> AALRDecision:
        """Decide the lr for the next epoch from this epoch's training loss."""
        loss = self._global_loss(loss)
        self.epochs += 1
        restored = self._phase_one(loss) if self.phase == 1 else self._phase_two(loss)
        self._set_lr()
        return AALRDecision(self.lr, restored)

    def _phase_one(self, loss: float) -> bool:
        self.good_epochs += 1
        restored = False
        if _is_nan(loss) or loss > self.best_loss:
            self.lr /= 2
            self._restore(self._initial_checkpoint)
            restored = True
            self.good_epochs = 0
            self.best_loss = self.initial_loss  # the initial model is back: its loss is the best again
        else:
            self.best_loss = loss
        if self.good_epochs >= self.patience:
            self._checkpoint = self._snapshot()
            self.lr *= 2
            self.wait_length = 1
            self.second_wait = False
            self.epochs_into_wait = 0
            self.phase = 2
        return restored

    def _phase_two(self, loss: float) -> bool:
        self.epochs_into_wait += 1
        if self.epochs_into_wait < self.wait_length:
            return False
        self.epochs_into_wait = 0
        nan = _is_nan(loss)
        if not nan and loss < self.best_loss:
            self.best_loss = loss
            self._checkpoint = self._snapshot()
            self.lr *= 2
            self.wait_length = 1
            self.second_wait = False
            return False
        if not self.second_wait and not nan:
            self.second_wait = True
            return False
        self.lr /= 2
        self.wait_length *= 2
        self.second_wait = False
        if nan:
            self._restore(self._checkpoint)
        return nan

    # ------------------------------------------------------------- reporting
    def stats(self) -> dict[str, float]:
        return {
            "lr": self.lr,
            "lr_min": self.lr,
            "lr_max": self.lr,
            "phase": self.phase,
            "best_loss": self.best_loss,
            "good_epochs": self.good_epochs,
            "wait_length": self.wait_length,
            "second_wait": self.second_wait,
            "epochs": self.epochs,
            "restores": self.restores,
        }

    _FIELDS = (
        "lr",
        "phase",
        "best_loss",
        "good_epochs",
        "wait_length",
        "second_wait",
        "epochs_into_wait",
        "epochs",
        "restores",
        "initial_lr",
        "patience",
        "initial_loss",
    )

    def state_dict(self) -> dict[str, Any]:
        """The controller's state, its checkpoints included (plain tensors and numbers)."""
        return {
            **{k: getattr(self, k) for k in self._FIELDS},
            "initial_checkpoint": copy.deepcopy(self._initial_checkpoint),
            "checkpoint": copy.deepcopy(self._checkpoint),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state from :meth:`state_dict`; a malformed one raises ValueError and changes nothing."""
        if not isinstance(state_dict, dict):
            raise ArgumentTypeError(f"state_dict must be a dict (AALR.state_dict()), got {type(state_dict).__name__}")
        missing = [k for k in (*self._FIELDS, "initial_checkpoint", "checkpoint") if k not in state_dict]
        if missing:
            raise ValueError(f"not an AALR state_dict: missing {missing}")
        check_range("lr", state_dict["lr"], 0.0)
        check_int("patience", state_dict["patience"], 1)
        if state_dict["phase"] not in (1, 2):
            raise ValueError(f"AALR state_dict has phase={state_dict['phase']!r}, expected 1 or 2")
        for name in ("initial_checkpoint", "checkpoint"):
            checkpoint = state_dict[name]
            if not (checkpoint is None and name == "checkpoint") and not (
                isinstance(checkpoint, dict) and {"model", "optimizer"} <= set(checkpoint)
            ):
                raise ValueError(f"AALR state_dict's {name} must be a dict with 'model' and 'optimizer'")
        for k in self._FIELDS:
            setattr(self, k, state_dict[k])
        self._initial_checkpoint = copy.deepcopy(state_dict["initial_checkpoint"])
        self._checkpoint = copy.deepcopy(state_dict["checkpoint"])
