"""PyTorch's own optimizer inputs, through the wrapper, against the plain optimizer.

Every configuration that ``optim_db`` (``torch.testing._internal.common_optimizers``, the table
PyTorch's ``TestOptimRenewed`` is driven by) lists for an optimizer (``optim_inputs_func`` on CPU, in
the default and each other implementation it supports on CPU: ``foreach``, ``fused``) runs as
IST around that optimizer (every layer active, probes off) and as the plain optimizer on a copy of a
small model whose parameters all lie in its layers. Both must give the same parameters and the same
optimizer state, bit for bit, after steps taken with and without a closure. Where IST refuses a
configuration (LBFGS with some layers inactive) the refusal is asserted. What the plain optimizer
itself cannot run on CPU is skipped, with its error as the reason.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import optim_db

from ist_optim import IST

OPTIMIZERS = (
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "LBFGS",
    "Adadelta",
    "Adafactor",
    "Adamax",
    "ASGD",
    "Muon",
    "NAdam",
    "RAdam",
    "Rprop",
)
STEPS = 3


class Block(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class Net(nn.Module):
    """Three blocks; every parameter is a layer parameter."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(bias) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def cases() -> list:
    found = []
    for info in optim_db:
        if info.name not in OPTIMIZERS:
            continue
        impls = [{}]  # the default: the for-loop implementation on CPU
        impls += [{"foreach": True}] if "foreach" in info.supported_impls else []
        impls += [{"fused": True}] if "fused" in info.supported_impls and "cpu" in info.supports_fused_on else []
        for optim_input in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            for impl in impls:
                name = f"{info.name}-{optim_input.desc}-{'+'.join(impl) or 'default'}".replace(" ", "_")
                found.append(pytest.param(info, optim_input, impl, id=name))
    return found


CASES = cases()


def test_every_named_optimizer_has_cases():
    assert {param.values[0].name for param in CASES} == set(OPTIMIZERS)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)


def run(model: nn.Module, opt: torch.optim.Optimizer, step: int, use_closure: bool) -> None:
    x, y = batch(step)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    if use_closure:
        opt.step(closure)
    else:
        closure()
        opt.step()


def assert_same(ours, theirs, where: str) -> None:
    if isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and math.isnan(ours):
        assert math.isnan(theirs), where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize(("info", "optim_input", "impl"), CASES)
def test_optim_db_input_through_ist_equals_the_plain_optimizer(info, optim_input, impl):
    cls = info.optim_cls
    bias = info.name != "Muon"  # Muon takes matrices only
    reference = Net(bias)
    model = copy.deepcopy(reference)
    kwargs = {**optim_input.kwargs, **impl}
    try:  # what the plain optimizer cannot run on CPU is not IST's to run
        ref_opt = cls(reference.parameters(), **copy.deepcopy(kwargs))
        run(reference, ref_opt, 0, use_closure=info.step_requires_closure)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        pytest.skip(f"the plain {info.name} cannot run {kwargs} on CPU: {error}")
    inner = cls(model.parameters(), **copy.deepcopy(kwargs))
    if info.step_requires_closure:
        sparse = copy.deepcopy(model)
        with pytest.raises(ValueError, match="LBFGS keeps one flat curvature history"):
            IST(cls(sparse.parameters(), **copy.deepcopy(kwargs)), sparse, active_layers=2, num_probes=0)
    opt = IST(inner, model, active_layers=1.0, num_probes=0)
    assert opt.layer_names == ["layers.0", "layers.1", "layers.2"]
    run(model, opt, 0, use_closure=info.step_requires_closure)
    for step in range(1, STEPS):
        use_closure = info.step_requires_closure or step % 2 == 1  # both ways of calling step()
        run(model, opt, step, use_closure)
        run(reference, ref_opt, step, use_closure)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert_same(opt.optimizer.state_dict(), ref_opt.state_dict(), "state_dict")
    assert opt.num_steps == STEPS
