"""torch.compile: compiled training steps that call ``optimizer.step()``, and the fused ops under the compiler.

How the package meets the compiler:

* ``optimizer.step()`` is excluded from tracing (``torch.compiler.disable``): Dynamo stops its graph at
  the call, the step runs as compiled C++/CUDA kernels (one op call per primitive, already fused), and
  the graph resumes after it. The optimizers' host-side controller state (step counters, AutoDrop's
  epoch logic) and Python-float learning rates therefore never become guards, so a changing learning
  rate cannot trigger a recompilation.
* The fused ops are registered with ``torch.library`` (schemas with their mutation annotations, fake
  kernels), so code that calls them directly traces them as ops: ``torch.library.opcheck`` checks the
  schema against what the kernels write, the fake kernels' output shapes, and an AOT dispatch, for the
  C++ ops and, when Triton runs on the CPU (interpreted), for the Triton ops.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_backends import CASES, lrs_of
from torch import nn

from autolr_fused import available_backends
from autolr_fused.backends import _ops
from autolr_fused.backends import triton as triton_backend  # also registers torch.ops.autolr_fused_triton
from autolr_fused.backends.primitives import REGULARIZED
from autolr_fused.directions import AdamConfig, SGDConfig

BACKENDS = [b for b in ("reference", "cpu") if b in available_backends()]
STEPS = 16


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts how often Dynamo compiled."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiles += 1
        return gm.forward


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def train(case: str, backend: str, compiler: CountingBackend | None) -> tuple[list, list, list]:
    """STEPS training steps; returns the parameters, the lrs and the compile count after every step."""
    model = make_model()
    opt = CASES[case](list(model.parameters()), backend)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    if compiler is not None:
        torch._dynamo.reset()
        train_step = torch.compile(train_step, backend=compiler)
    lrs, compiles = [], []
    for step in range(STEPS):
        train_step(*batch(step))
        lrs.append(lrs_of(opt))
        compiles.append(compiler.compiles if compiler else 0)
    return [p.detach().clone() for p in model.parameters()], lrs, compiles


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_equals_eager_and_changing_lrs_never_recompile(case, backend):
    compiler = CountingBackend()
    params, lrs, compiles = train(case, backend, compiler)
    eager_params, eager_lrs, _ = train(case, backend, None)
    # The compiled graphs run the same ops in the same order as eager mode: bit-identical.
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
    for a, b in zip(lrs, eager_lrs):
        assert torch.equal(a, b)
    # The first step compiles (the forward/backward before step() and the code after it); no later one does,
    # although the adaptive cases change their lrs (checked below) and their host counters on every step.
    assert compiles[0] >= 1
    assert compiles[-1] == compiles[0], f"recompiled: compile count per step {compiles}"
    if not case.startswith("sgd_") and case != "sgd":
        assert not torch.equal(lrs[0], lrs[-1]), "the case must change its lrs for the test to mean anything"


def sample_calls() -> dict[str, tuple]:
    """One argument tuple per fused op, with every optional input given (odd sizes, a 0-dim tensor)."""
    g = torch.Generator().manual_seed(0)

    def tensors(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
        return [torch.randn(s, generator=g) for s in shapes]

    shapes = ((5,), (3, 7), ())
    params, grads, buffers, prevs = (tensors(*shapes) for _ in range(4))
    snapshots, displacements, accumulators = (tensors(*shapes) for _ in range(3))
    lr, regret, scale, grad_scale = torch.tensor([0.1]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.5]), None
    sgd = SGDConfig(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=True, maximize=False)
    adam = AdamConfig(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled_weight_decay=True, maximize=True)
    exp_avgs, exp_avg_sqs = tensors(*shapes), [t.abs() for t in tensors(*shapes)]
    s, a = sgd, adam
    return {
        "sgd_step": (params, grads, buffers, lr, 0.0, s.momentum, s.dampening, s.weight_decay, s.nesterov,
                     s.maximize, False, prevs, _ops._STORE[REGULARIZED], regret, snapshots, displacements, scale,
                     accumulators, 2.0, grad_scale),
        "sgd_reduce": (params, grads, buffers, prevs, s.momentum, s.dampening, s.weight_decay, s.nesterov,
                       s.maximize, False, True, torch.tensor([2.0])),
        "boundary_pass": (params, snapshots, displacements, scale, accumulators, 3.0),
        "adam_step": (params, grads, exp_avgs, exp_avg_sqs, None, 1e-3, a.beta1, a.beta2, a.eps, a.weight_decay,
                      a.decoupled_weight_decay, a.maximize, 0.1, 0.05, prevs, regret, None),
        "adam_reduce": (params, grads, exp_avgs, exp_avg_sqs, prevs, a.beta1, a.beta2, a.eps, a.weight_decay,
                        a.decoupled_weight_decay, a.maximize, 0.1, 0.05, torch.tensor([4.0])),
    }  # fmt: skip


def op_namespaces() -> list:
    """The op libraries that run on the CPU sample tensors here: the C++ ops, and the Triton ops when interpreted."""
    out = [pytest.param("autolr_fused", marks=pytest.mark.skipif("cpu" not in BACKENDS, reason="no C++ extension"))]
    interpreted = "triton" in available_backends() and triton_backend.supports(torch.device("cpu"))
    no_triton = pytest.mark.skipif(not interpreted, reason="Triton does not run on CPU tensors here")
    out.append(pytest.param("autolr_fused_triton", marks=no_triton))
    return out


@pytest.mark.parametrize("namespace", op_namespaces())
@pytest.mark.parametrize("op", ["sgd_step", "sgd_reduce", "boundary_pass", "adam_step", "adam_reduce"])
def test_fused_op_passes_opcheck(op, namespace):
    args = sample_calls()[op]
    result = torch.library.opcheck(getattr(getattr(torch.ops, namespace), op).default, copy.deepcopy(args))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_fused_op_traces_into_one_graph_with_fullgraph():
    """A function calling an op compiles without a graph break and mutates its inputs as the eager op does."""
    args = sample_calls()["sgd_step"]
    eager_args, compiled_args = copy.deepcopy(args), copy.deepcopy(args)
    op = torch.ops.autolr_fused.sgd_step

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(*a):
        return op(*a)

    eager_stats = op(*eager_args)
    compiled_stats = step(*compiled_args)
    assert torch.equal(eager_stats, compiled_stats)
    for eager, compiled in zip(eager_args, compiled_args):
        if isinstance(eager, list):
            for x, y in zip(eager, compiled):
                assert torch.equal(x, y)
