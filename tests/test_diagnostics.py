"""``IST.importance_report``: per-layer two-batch signal, heterogeneity rho, and training left untouched.

References: the products against two plain backward passes (``torch.autograd.grad`` on a
copy of the model, by hand), rho against its formula, and the next training steps against
a run that never called the report (bit for bit).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from conftest import lm_batch, tiny_peft_llama
from torch import nn

from ist_optim import ImportanceReport, ISTAdamW
from ist_optim.diagnostics import gain_bound, heterogeneity


def _trained(seed: int = 0, dropout: float = 0.1, **options):
    model = tiny_peft_llama(4, dropout=dropout, seed=seed)
    model.train()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, probe_interval=1, seed=3, **options)
    model(**lm_batch(6, 8, seed=10)).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _hand_gradients(model: nn.Module, trained: nn.Module, batch: dict, parts: list[slice]) -> list[list[torch.Tensor]]:
    """Per part, per layer: the lora_B gradients of a plain copy of the model (eval mode, all layers trainable)."""
    model.load_state_dict(trained.state_dict())
    model.eval()
    per_layer = [[p for n, p in model.named_parameters() if f"layers.{i}." in n and "lora_B" in n] for i in range(4)]
    flat = [p for ps in per_layer for p in ps]
    out = []
    for part in parts:
        loss = model(**{k: v[part] for k, v in batch.items()}).loss
        grads = torch.autograd.grad(loss, flat)
        it = iter(grads)
        out.append([[next(it).double() for _ in ps] for ps in per_layer])
    return out


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def test_products_equal_two_plain_backward_passes_on_the_halves():
    model, opt = _trained()
    batch = lm_batch(6, 8, seed=11)
    model(**batch).loss.backward()  # the captured batch: this forward's
    report = opt.importance_report()
    assert report.params == "lora_B" and report.batch_rows == [3, 3]
    g1, g2 = _hand_gradients(tiny_peft_llama(4, dropout=0.1), model, batch, [slice(0, 3), slice(3, 6)])
    assert report.signal == pytest.approx([_dot(a, b) for a, b in zip(g1, g2)], rel=1e-9, abs=1e-15)
    assert report.noise == pytest.approx([(_dot(a, a) + _dot(b, b)) / 2 for a, b in zip(g1, g2)], rel=1e-9)


def test_groups_take_the_mean_of_all_pairwise_products():
    model, opt = _trained()
    batch = lm_batch(6, 8, seed=12)
    report = opt.importance_report(batch, groups=3)
    assert report.batch_rows == [2, 2, 2]
    g = _hand_gradients(tiny_peft_llama(4, dropout=0.1), model, batch, [slice(0, 2), slice(2, 4), slice(4, 6)])
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = [sum(_dot(g[j][layer], g[k][layer]) for j, k in pairs) / 3 for layer in range(4)]
    assert report.signal == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_rho_and_the_bound_follow_the_formula():
    assert heterogeneity([4.0, 1.0, 0.0, -2.0]) == pytest.approx((2 + 1) ** 2 / (4 * 5))  # negatives clipped
    assert heterogeneity([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert heterogeneity([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # 1/N: all in one layer
    assert heterogeneity([-1.0, 0.0]) is None and gain_bound(None) is None
    assert gain_bound(0.97) == pytest.approx(0.03)
    _, opt = _trained()
    report = opt.importance_report(lm_batch(8, 8, seed=13))
    g = [max(v, 0.0) for v in report.signal]
    if sum(g) > 0:
        assert report.rho == pytest.approx(sum(math.sqrt(v) for v in g) ** 2 / (len(g) * sum(g)), rel=1e-12)
        assert report.gain_bound == pytest.approx(1 - report.rho)


def _run(call_report: bool):
    torch.manual_seed(0)
    model, opt = _trained(dropout=0.1)  # dropout on in training: the report must not move the RNG
    trace = []
    for step in range(3):
        model(**lm_batch(6, 8, seed=20 + step)).loss.backward()
        if call_report:
            grads = {n: p.grad for n, p in model.named_parameters()}
            saved = {n: g.clone() for n, g in grads.items() if g is not None}
            flags = {n: p.requires_grad for n, p in model.named_parameters()}
            probe_batch = opt.hooks.probe_batch
            report = opt.importance_report()
            report = opt.importance_report(lm_batch(4, 8, seed=99), groups=4)  # a batch of its own too
            report = opt.importance_report(train_mode=True)  # dropout draws random numbers here
            assert isinstance(report, ImportanceReport)
            for n, p in model.named_parameters():
                assert p.grad is grads[n]  # the same tensors, unchanged
                if p.grad is not None:
                    assert torch.equal(p.grad, saved[n])
                assert p.requires_grad == flags[n]
            assert opt.hooks.probe_batch is probe_batch  # the report's forwards captured nothing
            assert model.training and all(m.training for m in model.modules())
        opt.step()
        opt.zero_grad()
        trace.append(opt.active_layers)
    state = opt.state_dict()
    return model, opt, trace, state, torch.random.get_rng_state()


def test_training_after_a_report_is_bit_identical_to_training_without_one():
    model_a, opt_a, trace_a, state_a, rng_a = _run(call_report=True)
    model_b, opt_b, trace_b, state_b, rng_b = _run(call_report=False)
    assert trace_a == trace_b
    assert torch.equal(rng_a, rng_b)
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(opt_a.scheduler.importance, opt_b.scheduler.importance)
    for key, value in state_a["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, state_b["state"][key][name]), (key, name)
    assert torch.equal(state_a["ist"]["scheduler"]["generator"], state_b["ist"]["scheduler"]["generator"])
    assert opt_a.hooks._user_frozen == opt_b.hooks._user_frozen  # the report's flag writes were IST's own


# ---------------------------------------------------------------------- constructed signals
class Branch(nn.Module):
    def __init__(self, dim: int, rank: int, scale: float, up: str = "lora_B") -> None:
        super().__init__()
        self.lora_A = nn.Linear(dim, rank, bias=False)
        setattr(self, up, nn.Linear(rank, dim, bias=False))
        self.up_name, self.scale = up, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * getattr(self, self.up_name)(self.lora_A(x))


class Parallel(nn.Module):
    """``out = sum_l c_l B_l A_l x``, loss ``mean (out - y)^2``: layer l's B gradient is c_l times a shared one."""

    def __init__(self, scales: list[float], dim: int = 8, up: str = "lora_B") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Branch(dim, 2, c, up) for c in scales)
        first = self.layers[0]
        with torch.no_grad():
            for branch in self.layers:  # the same weights in every layer: only c_l differs
                branch.lora_A.weight.copy_(first.lora_A.weight)
                getattr(branch, up).weight.copy_(getattr(first, up).weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        out = sum(branch(x) for branch in self.layers)
        return {"loss": ((out - y) ** 2).mean()}


def _toy_batch(rows: int = 8, dim: int = 8, flip: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.ones(rows, dim) + 0.01 * torch.randn(rows, dim, generator=g)
    y = 3.0 * torch.ones(rows, dim)
    if flip:  # the halves pull in opposite directions: no signal
        y[rows // 2 :] *= -1
    return {"x": x, "y": y}


def test_one_dominant_layer_gives_small_rho_and_is_named():
    model = Parallel([10.0, 1.0, 1.0, 1.0])
    opt = ISTAdamW(model, lr=1e-2, policy="random", active_layers=1)
    report = opt.importance_report(_toy_batch())
    # G_l = c_l^2 G exactly: rho = (10 + 3)^2 / (4 (100 + 3))
    assert report.rho == pytest.approx(13**2 / (4 * 103), rel=1e-6)
    assert report.top_layers == [0] and report.near_uniform is False
    assert "concentrated in layers [0 (layers.0)]" in report.sentence and "can pay" in report.sentence


def test_equal_layers_give_rho_near_one_and_call_uniform_near_optimal():
    model = Parallel([1.0, 1.0, 1.0, 1.0])
    opt = ISTAdamW(model, lr=1e-2, policy="random", active_layers=1)
    model.train()
    model(**_toy_batch())["loss"].backward()  # a training forward: the default batch
    report = opt.importance_report()
    assert report.rho == pytest.approx(1.0, abs=1e-9) and report.gain_bound == pytest.approx(0.0, abs=1e-9)
    assert report.near_uniform is True
    assert report.sentence.startswith("rho = 1.00: the layers' signals are nearly equal; uniform layer choice is")
    assert "at most 0% less gradient variance" in report.sentence


def test_no_signal_is_said_plainly():
    model = Parallel([1.0, 1.0, 1.0])
    with torch.no_grad():
        for branch in model.layers:
            branch.lora_B.weight.zero_()  # out = 0: the halves' gradients are exact opposites
    opt = ISTAdamW(model, lr=1e-2, policy="random", active_layers=1)
    report = opt.importance_report(_toy_batch(flip=True))
    assert all(g < 0 for g in report.signal) and report.rho is None and report.near_uniform is None
    assert report.sentence.startswith("no measurable signal") and "too small or too noisy" in report.sentence


def test_other_adapters_fall_back_to_all_trainable_parameters_and_say_so():
    model = Parallel([2.0, 1.0], up="up")
    opt = ISTAdamW(model, lr=1e-2, policy="random", active_layers=1)
    report = opt.importance_report(_toy_batch())
    assert report.params.startswith("all trainable parameters of each layer (2 of 2 layers have no peft lora_B")
    assert report.signal[0] > report.signal[1] > 0


def test_refusals_are_clear():
    model = tiny_peft_llama(4)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1)
    with pytest.raises(RuntimeError, match="no batch captured yet; call it after a training step .* or pass batch="):
        opt.importance_report()
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        opt.importance_report(lm_batch(1, 8))
    with pytest.raises(ValueError, match="Invalid groups"):
        opt.importance_report(lm_batch(4, 8), groups=1)


def test_report_prints_a_table_and_serialises():
    _, opt = _trained()
    report = opt.importance_report(lm_batch(8, 8, seed=14))
    text = str(report)
    assert text.splitlines()[0].startswith("importance report: rho") and report.sentence in text
    assert len([line for line in text.splitlines() if "layers." in line]) >= 4
    loaded = json.loads(json.dumps(report.to_dict()))
    assert loaded["signal"] == report.signal and loaded["layer_names"] == opt.layer_names
    assert set(loaded) >= {"signal", "noise", "rho", "gain_bound", "top_layers", "sentence", "batch_rows"}


def test_set_loss_inputs_of_the_captured_step_reach_the_report():
    """A loss outside the model (a verbalizer's target): the captured batch's step's loss inputs are used."""

    def loss_fn(output, *args, target, **kwargs):
        return nn.functional.cross_entropy(output.logits[:, -1], target)

    model = tiny_peft_llama(4)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, loss_fn=loss_fn)
    batch = {k: v for k, v in lm_batch(6, 8, seed=15).items() if k != "labels"}
    target = torch.arange(6) % 5
    loss_fn(model(**batch), target=target).backward()
    opt.set_loss_inputs(target=target)
    opt.step()
    opt.zero_grad()
    report = opt.importance_report()
    assert report.signal == opt.importance_report(batch, loss_inputs={"target": target}).signal
    model(**batch)  # a newer training forward: the old target no longer belongs to the captured batch
    with pytest.raises(TypeError, match="target"):
        opt.importance_report()


# ---------------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_report(rank: int, rows: int) -> dict:
    from test_distributed import init_gloo
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank)
    model = DDP(tiny_peft_llama(4, dtype=torch.float64), find_unused_parameters=True)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, seed=3)
    model(**lm_batch(4, 8, seed=30 + rank)).loss.backward()
    opt.step()
    opt.zero_grad()
    try:
        report = opt.importance_report(lm_batch(rows if rank == 1 else 4, 8, seed=40 + rank))
    except (RuntimeError, ValueError) as error:
        return {"error": str(error)}
    return {"signal": report.signal, "world": report.world_size}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_averages_the_ranks_products_and_refuses_together(tmp_path):
    from test_distributed import run_workers

    tiny_peft_llama()  # lazy imports before forking
    results = run_workers(_ddp_report, tmp_path, 4)
    assert results[0] == results[1] and results[0]["world"] == 2
    # each rank's products, as one process computes them on that rank's batch
    expected = []
    for rank in range(2):
        model = tiny_peft_llama(4, dtype=torch.float64)
        opt = ISTAdamW(model, lr=1e-2, active_layers=1, seed=3)
        for r in range(2):  # DDP's step: the mean gradient of both ranks' batches
            (model(**lm_batch(4, 8, seed=30 + r)).loss / 2).backward()
        opt.step()
        expected.append(opt.importance_report(lm_batch(4, 8, seed=40 + rank)).signal)
    assert results[0]["signal"] == pytest.approx([(a + b) / 2 for a, b in zip(*expected)], rel=1e-9)
    failed = run_workers(_ddp_report, tmp_path, 1)  # rank 1 has 1 row: both ranks raise, none hangs
    assert "needs >= 2 rows" in failed[1]["error"] and "failed on another rank" in failed[0]["error"]
