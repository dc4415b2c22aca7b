"""The shared ``torch.optim.Optimizer`` base of every autolr_fused optimizer.

It owns the optimizer contract (argument checks before any state changes,
param groups, state_dict with the controller's host-side state, backends) so
that each public class only wires a direction, a step-size controller and a
backend together.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import (
    ArgumentTypeError,
    check_bool,
    check_gradients,
    check_parameters,
    check_state_dict,
    gradients_are_finite,
)
from autolr_fused.backends import resolve_backend
from autolr_fused.distributed import LocalShardOps, Sharding, is_dtensor, local


def _untraced(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, made on the first call.

    Making it at import time would import the compiler stack (about 1.4 s, and Triton
    in its compiled mode) with this package; torch.optim's own step defers it the same way.
    """
    disabled = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


# torch.distributed.checkpoint's state_dict helpers (get/set_optimizer_state_dict) keep only ``state`` and
# ``param_groups``: the controller's state therefore travels in the first param group, under this key.
STATE_DICT_ENTRY = "autolr_fused"
_DCP_STATE_DICT_MODULE = "torch.distributed.checkpoint.state_dict"


def _called_from_dcp(function: str) -> bool:
    """Whether ``torch.distributed.checkpoint.state_dict.<function>`` is among the last few callers."""
    frame = sys._getframe(2)
    for _ in range(12):  # the step's own wrappers (no_grad, torch.compiler.disable) lie in between
        if frame is None:
            return False
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == _DCP_STATE_DICT_MODULE:
            return True
        frame = frame.f_back
    return False


def lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    """A new 0-dim float32 tensor on ``device`` holding ``lr`` (adapted lrs live there)."""
    return torch.as_tensor(lr, dtype=torch.float32).reshape(()).to(device).clone()


def _split_names(param_group: dict[str, Any], params: list) -> tuple[dict[str, Any], list]:
    """``named_parameters()`` as torch.optim takes them: ``(name, tensor)`` pairs become the group's
    ``params`` and ``param_names`` (kept in state_dict, as torch does); all named or none."""
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return param_group, params
    if not all(named):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    if any(len(p) != 2 or not isinstance(p[0], str) for p in params):
        raise ArgumentTypeError("named parameters must be (name, tensor) pairs, as module.named_parameters() gives")
    return {**param_group, "param_names": [name for name, _ in params]}, [tensor for _, tensor in params]


class AutoLROptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_check_group`` and ``_step``.

    Class attributes a subclass sets:

    * ``_global_keys``: hyperparameters that must be equal in every group (they
      configure one optimizer-wide controller).
    * ``_float32_state_keys``: per-parameter state kept in float32 whatever the
      parameter dtype (learning rates and statistics).
    * ``_lr_on_device``: the group lr is adapted on the device, so it is kept as
      a 0-dim float32 tensor on the parameters' device.
    * ``_state_schema``: every per-parameter state key the optimizer may keep and
      its kind (see ``autolr_fused._validation.check_state_dict``), and
      ``_state_bundles`` the keys that exist together; load_state_dict refuses
      anything else.
    * ``_optional_group_keys``: hyperparameters a saved param group may lack
      (``__setstate__`` fills them, as torch does for old state_dicts).
    * ``_torch_layout``: the state_dict is torch.optim.SGD's, with no entry of
      this package (FusedSGD); every other optimizer saves its controller
      state, last statistics and state keys in ``param_groups[0]["autolr_fused"]``.

    Non-finite statistics: the controllers never let one reach a learning rate
    (the lr stays); the step records on the device that it happened (no host
    read), and the first call that synchronises anyway (``stats()``,
    ``state_dict()``, AutoDrop's epoch end) emits one ``RuntimeWarning``.
    ``skip_nonfinite=True`` instead skips every step whose gradients are not
    all finite, as GradScaler does.
    """

    # GradScaler hands this optimizer its scale and inf flag (``grad_scale``/``found_inf``
    # attributes) instead of unscaling the gradients itself; the primitives unscale.
    _step_supports_amp_scaling = True
    _global_keys: tuple[str, ...] = ()
    _float32_state_keys: tuple[str, ...] = ()
    _lr_on_device: bool = False
    _state_schema: dict[str, str] = {}
    _state_bundles: tuple[tuple[str, ...], ...] = ()
    _optional_group_keys: tuple[str, ...] = ()
    _torch_layout: bool = False

    def __init__(
        self, params: Iterable, defaults: dict[str, Any], backend: str = "auto", *, skip_nonfinite: bool = False
    ) -> None:
        if isinstance(params, (set, frozenset)) or not isinstance(params, Iterable) or isinstance(params, Tensor):
            kind = "a set (its order is not reproducible)" if isinstance(params, (set, frozenset)) else None
            raise ArgumentTypeError(
                "params must be an ordered iterable (list, tuple, generator) of Tensors or of param-group dicts, "
                f"got {kind or type(params).__name__}"
            )
        self._sharding: Sharding | None = None  # set by add_param_group when a parameter is a DTensor
        self._use_backend(*resolve_backend(backend))
        # A setting of this optimizer object, like ``backend``: not a hyperparameter of a group (FusedSGD's
        # param_groups stay torch.optim.SGD's) and not in state_dict (load_state_dict keeps it).
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self._check_group(dict(defaults))
        # Host-side controller state: plain Python numbers, saved in state_dict.
        self._controller: dict[str, Any] = self._initial_controller_state(defaults)
        # The last per-step statistics, as device tensors (read only by stats()), saved in state_dict.
        self._statistics: dict[str, Tensor] = {}
        self._grad_scale: Tensor | None = None  # GradScaler's scale during a step, else None
        self._flat_cache: tuple[tuple[int, ...], dict[str, Tensor]] | None = None  # see _flat_state
        # A 0-dim bool device tensor: a statistic that was not finite has been kept from an lr since the
        # last warning check (see _note_nonfinite); None until a step records one.
        self._nonfinite_seen: Tensor | None = None
        self._nonfinite_warned = False
        # True while ``state`` only holds the template torch.distributed.checkpoint made (see _template_step).
        self._template_state = False
        super().__init__(params, defaults)
        if backend == "auto":  # now that the parameters' device is known
            self._use_backend(*resolve_backend(backend, self._device()))

    def _use_backend(self, name: str, ops: Any) -> None:
        """Step with backend ``ops``; with DTensor parameters, through their local shards."""
        self.backend, self._backend_ops = name, ops
        self._ops = ops if self._sharding is None else LocalShardOps(ops)

    # ------------------------------------------------------- pickle and deepcopy
    # torch.optim.Optimizer pickles only defaults, state and param_groups; this optimizer also owns its
    # controller state, last statistics and settings. The backend module and the sharding are not
    # pickled: they are found again from the backend's name and the parameters.
    _UNPICKLED = ("_ops", "_backend_ops", "_sharding", "_flat_cache", "_snapshots_taken")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "backend" not in state:  # pickled by an older version (torch's three keys): nothing to restore
            return
        self._forget_state_caches()
        self._sharding = Sharding.of(self._all_params())
        self._use_backend(*resolve_backend(self.backend, self._device()))

    # ----------------------------------------------------------------- groups
    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _initial_controller_state(self, defaults: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _late_state_keys(self) -> dict[str, torch.dtype | None]:
        """Per-parameter state keys that appear only after some steps, with their dtype (None: the parameter's).

        The state_dict that ``get_optimizer_state_dict`` takes holds them for every
        parameter with state (as zeros where they do not exist yet), so that a
        ``torch.distributed.checkpoint.load`` template always has the saved keys.
        """
        return {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a param group must have a 'params' entry (the tensors it holds)")
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be organized in ordered collections, not a set")
        params = [params] if isinstance(params, Tensor) else list(params) if params is not None else []
        param_group, params = _split_names(param_group, params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears more than once in a parameter group")
        check_parameters(params, self._all_params() if hasattr(self, "param_groups") else [])
        full = {**self.defaults, **param_group, "params": params}
        for key in self._global_keys:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(f"{key} is optimizer-wide and cannot differ per parameter group")
        self._check_group(full)
        sharding = self._sharding
        if sharding is not None or any(is_dtensor(p) for p in params):
            sharding = Sharding.of([*self._all_params(), *params])  # checks the new group before it is added
        super().add_param_group({**param_group, "params": params})
        if sharding is not self._sharding:
            self._sharding = sharding
            self._use_backend(self.backend, self._backend_ops)
        if self._lr_on_device:
            self._lr_tensor(self.param_groups[-1])

    def _lr_tensor(self, group: dict[str, Any]) -> Tensor:
        """The group's lr as a 0-dim float32 tensor on its parameters' device."""
        lr = group["lr"]
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        if not (isinstance(lr, Tensor) and lr.dtype == torch.float32 and lr.device == device and lr.dim() == 0):
            lr = group["lr"] = lr_tensor(lr, device)
        return lr

    @staticmethod
    def _grad_params(group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _prevs(
        self, params: list[Tensor], key: str, seed: Callable[[dict[str, Any]], Tensor | None] | None = None
    ) -> list[Tensor]:
        """``state[p][key]`` of every tensor, created where missing: ``seed(state[p])`` where it gives a
        tensor, else zeros (parameter dtype and layout)."""
        state_of = self.state
        try:  # the usual step: every tensor has it
            return [state_of[p][key] for p in params]
        except KeyError:
            pass
        out = []
        for p in params:
            state = state_of[p]
            if key not in state:
                first = None if seed is None else seed(state)
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format) if first is None else first
            out.append(state[key])
        return out

    def _cached_flat_state(self, ids: tuple[int, ...], keys: tuple[str, ...]) -> dict[str, Tensor] | None:
        """``_flat_state``'s vectors if they are built for the tensors of ``ids`` (in order) and ``keys``, else None.

        Then every one of those tensors has ``keys`` in its state: a step may skip creating them.
        """
        cache = self._flat_cache
        if cache is not None and cache[0] == ids and all(k in cache[1] for k in keys):
            return cache[1]
        return None

    def _flat_state(
        self, params: list[Tensor], keys: tuple[str, ...], ids: tuple[int, ...] | None = None
    ) -> dict[str, Tensor]:
        """Per key, a 1-D float32 tensor whose element i *is* ``state[params[i]][key]``.

        Per-tensor scalars (learning rates, the last inner product, ...) stay 0-dim
        tensors in ``state`` (that is the state_dict layout), but as views into one
        vector per key, so that a step reads and writes them as whole vectors, with
        no stack or copy per tensor. The vectors are rebuilt when the list of
        tensors changes or after load_state_dict. ``ids``: ``id`` of every tensor
        of ``params``, where the caller has them already.
        """
        ids = tuple(map(id, params)) if ids is None else ids
        cached = self._cached_flat_state(ids, keys)
        if cached is not None:
            return cached
        device = params[0].device
        flats = {
            k: torch.stack([self.state[p][k].reshape(()).to(device=device, dtype=torch.float32) for p in params])
            for k in keys
        }
        for k, flat in flats.items():
            for p, view in zip(params, flat.unbind(0)):
                self.state[p][k] = view
        self._flat_cache = (ids, flats)
        return flats

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------- step
    # Inside torch.compile'd code the step runs as its own fused ops, untraced: the host-side controller
    # state (counters, epoch logic) and Python-float lrs would otherwise become guards that recompile as
    # they change. tests/test_compile.py counts the compiles.
    @_untraced
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_gradients(self.param_groups)
        if self._sharding is not None:
            self._sharding.check_gradients(self.param_groups)
        found_inf = getattr(self, "found_inf", None)
        # A step GradScaler skips changes nothing, host-side counters included, so the
        # flag is read here: the one synchronisation of a step under a GradScaler.
        if found_inf is not None and bool(found_inf.item()):
            return loss
        # skip_nonfinite: the same contract without a GradScaler (whose flag already answers when there is one).
        if found_inf is None and self.skip_nonfinite and not self._gradients_are_finite():
            return loss
        if (
            not self._torch_layout
            and (self._template_state or not self.state)
            and _called_from_dcp("_init_optim_state")
        ):
            self._template_step()
            return loss
        if self._template_state:  # the first real step: the template goes, the state starts as usual
            self._drop_template_state()
        grad_scale = getattr(self, "grad_scale", None)
        self._grad_scale = None if grad_scale is None else grad_scale.to(torch.float32).reshape(1)
        try:
            self._step()
        finally:
            self._grad_scale = None
        return loss

    def _template_step(self) -> None:
        """The step torch.distributed.checkpoint's state_dict helpers take to create the state: changes nothing.

        ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` step an
        optimizer whose ``state`` is empty once, with zero gradients and every
        group lr set to 0, so that its state tensors exist (the template that
        ``dcp.load`` loads into). Here that step creates the per-parameter state
        as a first step would, and then puts back everything else (controller,
        statistics, warnings); the state is marked as a template, which the
        next real step drops (it is then the first step, as if the helpers had
        never run) and ``load_state_dict`` replaces. The parameters are not
        changed: every lr of the step is 0.
        """
        if self._template_state:
            self._drop_template_state()
        controller = copy.deepcopy(self._controller)
        statistics = dict(self._statistics)
        seen = None if self._nonfinite_seen is None else self._nonfinite_seen.clone()
        warned = self._nonfinite_warned
        try:
            self._step()
        finally:
            self._controller, self._statistics = controller, statistics
            self._nonfinite_seen, self._nonfinite_warned = seen, warned
            self._template_state = True

    def _drop_template_state(self) -> None:
        self.state.clear()
        self._forget_state_caches()
        self._template_state = False

    def _forget_state_caches(self) -> None:
        """Drop what is derived from ``state`` (the flat per-tensor vectors, the snapshot count); rebuilt on use."""
        self._flat_cache = None
        self.__dict__.pop("_snapshots_taken", None)

    def _gradients_are_finite(self) -> bool:
        """skip_nonfinite's test (one host read); with sharded parameters every rank decides alike."""
        if self._sharding is None:
            return bool(gradients_are_finite(self.param_groups))
        return self._sharding.all_ranks_finite(gradients_are_finite(self.param_groups, local))

    def _step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _global_rows(self, rows: Tensor, param_lists: list[list[Tensor]]) -> Tensor:
        """The primitives' statistic rows (one per tensor of ``param_lists``, in order) over whole tensors.

        They already are unless parameters are sharded; then each rank's rows are
        partial sums over its shards, summed here with one all_reduce (see
        ``autolr_fused.distributed``). Every controller reads its rows through this.
        The tensors come as the lists the primitives were called with, joined only
        when sharded: the unsharded path costs one attribute test.
        """
        if self._sharding is None:
            return rows
        return self._sharding.sum_rows(rows, list(itertools.chain.from_iterable(param_lists)))

    # ------------------------------------------------------ non-finite statistics
    def _note_nonfinite(self, statistics: Tensor) -> None:
        """Record on the device, without reading anything back, whether ``statistics`` holds inf or NaN.

        The caller's controller keeps such statistics from the lrs; this only
        remembers that it happened, for the one warning.
        """
        if self._nonfinite_warned:  # warned already: nothing left to record
            return
        bad = torch.isfinite(statistics).all().logical_not()
        if self._nonfinite_seen is None:
            self._nonfinite_seen = bad
        else:
            self._nonfinite_seen.logical_or_(bad)

    def _warn_nonfinite(self, seen: bool = False) -> None:
        """Emit the one RuntimeWarning if a non-finite statistic was met (``seen``, or the device flag).

        Called only where the optimizer synchronises anyway, since reading the flag does.
        """
        if self._nonfinite_warned:
            return
        if not seen and self._nonfinite_seen is not None:
            seen = bool(self._nonfinite_seen)
        if seen:
            self._nonfinite_warned = True
            self._nonfinite_seen = None
            warnings.warn(
                f"{type(self).__name__}: some step statistics were not finite (inf/NaN gradients or parameters, "
                "an overflow, or in FusedTLR's window mode an lr of 0); they were kept from the learning rate, "
                "which stayed unchanged there (the parameters follow torch.optim.SGD and may not be finite). "
                "Pass skip_nonfinite=True to skip steps with inf/NaN gradients, or use torch.amp.GradScaler. "
                "This warning is emitted once per optimizer.",
                RuntimeWarning,
                stacklevel=3,
            )

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        self._warn_nonfinite()
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if isinstance(group.get("lr"), Tensor):
                group["lr"] = group["lr"].detach().clone()
        if self._torch_layout:
            return sd
        params = self._all_params()
        state_keys = [sorted(self.state[p]) if p in self.state else [] for p in params]
        if _called_from_dcp("_get_optim_state_dict"):
            # get_optimizer_state_dict: a fixed set of keys per parameter, so that this state_dict can serve as
            # the template dcp.load fills (load_state_dict drops the zeros again, by state_keys).
            by_id = dict(zip(itertools.chain.from_iterable(g["params"] for g in sd["param_groups"]), params))
            late = self._late_state_keys()
            for pid, entry in list(sd["state"].items()):
                zeros = {
                    key: torch.zeros_like(by_id[pid], dtype=dtype, memory_format=torch.preserve_format)
                    for key, dtype in late.items()
                    if key not in entry
                }
                if zeros:  # a new dict: ``entry`` is the optimizer's own state
                    sd["state"][pid] = {**entry, **zeros}
        if sd["param_groups"]:
            # One JSON string: torch.distributed.checkpoint flattens nested dicts and lists into one item
            # per leaf (empty lists vanish, and a dcp.load template would have to match every leaf), while a
            # string is one value that loads whole. The statistics (device tensors) go as numbers.
            sd["param_groups"][0][STATE_DICT_ENTRY] = json.dumps(
                {
                    "controller": self._controller,
                    "statistics": [
                        [key, value.detach().cpu().reshape(-1).tolist(), list(value.shape), str(value.dtype)[6:]]
                        for key, value in self._statistics.items()
                    ],
                    "state_keys": state_keys,
                    "template_state": self._template_state,
                }
            )
        return sd

    def _saved_entry(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """This package's entry of ``state_dict`` (checked), and ``state_dict`` without it."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
            return {}, state_dict  # check_state_dict names what is wrong
        entry = groups[0].get(STATE_DICT_ENTRY)
        if entry is None:
            raise ValueError(
                f"state_dict has no param_groups[0][{STATE_DICT_ENTRY!r}] entry (the controller state "
                f"{type(self).__name__} needs): was it saved by another optimizer, or through "
                "get_optimizer_state_dict(options=StateDictOptions(flatten_optimizer_state_dict=True)), which "
                "keeps only the keys a fresh optimizer's param groups have? Save it without flattening."
            )
        try:
            entry = json.loads(entry)
        except (TypeError, ValueError):
            entry = None
        if not isinstance(entry, dict) or set(entry) != {"controller", "statistics", "state_keys", "template_state"}:
            raise ValueError(f"state_dict's param_groups[0][{STATE_DICT_ENTRY!r}] is not this package's entry")
        groups = [{k: v for k, v in g.items() if k != STATE_DICT_ENTRY} if isinstance(g, dict) else g for g in groups]
        return entry, {**state_dict, "param_groups": groups}

    @staticmethod
    def _saved_state_keys(state_dict: dict[str, Any], state_keys: Any) -> dict[Any, dict[str, Any]]:
        """``state_dict["state"]`` with only the keys the saved optimizer had (``state_keys``, one list per parameter).

        The zeros get_optimizer_state_dict adds for keys that do not exist yet go;
        a key the saved optimizer had but ``state_dict`` lacks raises ValueError.
        """
        pids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        if not isinstance(state_keys, list) or len(state_keys) != len(pids):
            raise ValueError(f"state_dict's {STATE_DICT_ENTRY!r} entry does not list the state keys of every parameter")
        saved_state, state = state_dict["state"], {}
        for pid, keys in zip(pids, state_keys):
            missing = set(keys) - set(saved_state.get(pid, {}))
            if missing:
                raise ValueError(
                    f"state_dict lacks the state {sorted(missing)} of parameter {pid!r}, which the saved optimizer "
                    "had: with torch.distributed.checkpoint, load into the output of get_optimizer_state_dict"
                )
            if pid in saved_state:
                state[pid] = {k: v for k, v in saved_state[pid].items() if k in keys}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict from ``state_dict()`` (or torch.optim.SGD's, for FusedSGD).

        Everything is checked before anything changes: the number of groups and of
        parameters per group, the hyperparameters (present and valid), that the
        controller state and every per-parameter state key belong to this
        optimizer class, and the shape and dtype of every state tensor. A mismatch
        raises ValueError and leaves the optimizer as it was. ``skip_nonfinite``
        and ``backend`` are settings of this object and stay as constructed.
        """
        entry: dict[str, Any] = {}
        if not self._torch_layout:
            entry, state_dict = self._saved_entry(state_dict)
        elif any(isinstance(g, dict) and STATE_DICT_ENTRY in g for g in state_dict.get("param_groups", ())):
            raise ValueError(
                f"state_dict holds the controller state of another autolr_fused optimizer; {type(self).__name__} "
                "loads torch.optim.SGD's state_dicts"
            )
        check_state_dict(
            state_dict,
            self.param_groups,
            schema=self._state_schema,
            bundles=self._state_bundles,
            optional_group_keys=self._optional_group_keys,
            required_group_keys=tuple(self.defaults),
            owner=type(self).__name__,
        )
        if entry:
            state_dict = {**state_dict, "state": self._saved_state_keys(state_dict, entry["state_keys"])}
        for saved in state_dict["param_groups"]:
            # Adapted lrs may be any finite number (hypergradient descent can take one below 0): the check
            # above read them as finite; the rest of the group must pass the constructor's checks.
            self._check_group({**self.defaults, **saved, "lr": 0.0})
        expected = self._initial_controller_state(self.defaults)
        saved_controller = entry.get("controller", {})
        if not isinstance(saved_controller, dict) or set(saved_controller) != set(expected):
            raise ValueError(
                f"state_dict does not hold this {type(self).__name__}'s controller state "
                f"(expected keys {sorted(expected)}, got {sorted(saved_controller)}); "
                "was it saved from a different optimizer?"
            )
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for key in self._global_keys:
                if key in saved and saved[key] != group[key]:
                    raise ValueError(
                        f"state_dict was saved with {key}={saved[key]!r}, this optimizer has {group[key]!r}"
                    )
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype: put float32 state back.
        saved_state = state_dict["state"]
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(group["params"], saved["params"]):
                for key in self._float32_state_keys:
                    value = saved_state.get(pid, {}).get(key)
                    if isinstance(value, Tensor):
                        self.state[p][key] = value.detach().to(device=p.device, dtype=torch.float32).clone()
            if self._lr_on_device:
                self._lr_tensor(group)
        self._controller = copy.deepcopy(saved_controller) if expected else {}
        self._forget_state_caches()
        device = self._device()
        self._statistics = {
            key: torch.tensor(values, dtype=getattr(torch, dtype), device=device).reshape(shape)
            for key, values, shape, dtype in entry.get("statistics", [])
        }
        self._template_state = bool(entry.get("template_state", False))

    # ------------------------------------------------------------------ stats
    def stats(self, per_tensor: bool = False) -> dict[str, float]:
        """Plain Python numbers for logging (this reads device values: it synchronises).

        Always ``lr``, ``lr_min`` and ``lr_max`` (over groups, or over tensors for
        per-tensor lrs), plus the method's own statistics. With ``per_tensor=True``
        also ``"lr/<i>"``, the lr tensor ``i`` is updated with, and for
        :class:`FusedAutoDropSGD` ``"angle/<i>"``, the angle between tensor ``i``'s
        last two epoch displacements (NaN before the second epoch end); ``i`` is the
        tensor's position in the optimizer's parameter order (groups in order: the
        keys of ``state_dict()["state"]``). The per-tensor values come from what the
        steps keep anyway, so asking for them costs nothing until ``stats`` is called.
        Emits the one RuntimeWarning if a step met non-finite statistics since.
        """
        self._warn_nonfinite()
        out = self._summary_stats()
        if per_tensor:
            out.update(self._per_tensor_stats())
        return out

    def _summary_stats(self) -> dict[str, float]:
        lrs = [float(group["lr"]) for group in self.param_groups]
        return {"lr": lrs[0], "lr_min": min(lrs), "lr_max": max(lrs)}

    def _per_tensor_stats(self) -> dict[str, float]:
        """``"lr/<i>"`` per tensor: its own ``state[p]["lr"]`` where it has one, else its group's lr."""
        lrs = [
            self.state[p]["lr"] if p in self.state and "lr" in self.state[p] else group["lr"]
            for group in self.param_groups
            for p in group["params"]
        ]
        on_device = [i for i, lr in enumerate(lrs) if isinstance(lr, Tensor)]
        if on_device:  # one read back for all of them
            values = torch.stack([lrs[i].reshape(()).to(lrs[on_device[0]].device, torch.float32) for i in on_device])
            for i, value in zip(on_device, values.tolist()):
                lrs[i] = value
        return {f"lr/{i}": float(lr) for i, lr in enumerate(lrs)}

    @staticmethod
    def _lr_summary(lrs: list[Tensor]) -> dict[str, float]:
        """lr statistics of per-tensor learning rates (mean, min, max over tensors)."""
        if not lrs:
            return {"lr": float("nan"), "lr_min": float("nan"), "lr_max": float("nan")}
        values = torch.stack([lr.to(lrs[0].device) for lr in lrs]).double()
        return {"lr": values.mean().item(), "lr_min": values.min().item(), "lr_max": values.max().item()}
