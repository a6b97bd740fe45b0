"""``probe_rows`` and ``inference_mode`` probes, against probes run by hand and against the no_grad path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama
from torch import nn

from ist_optim import IST, ISTAdamW, discover_layers, find_adapter_modules
from ist_optim import probes as probes_module
from ist_optim.probes import probe_losses, probe_row_count, take_rows


def adapters_of(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return find_adapter_modules(model, discover_layers(model, params).params)


def recorded_rounds(opt, monkeypatch):
    """Every probe round's ``(beta, losses)`` as IST ran it."""
    rounds = []
    original = opt.scheduler.update

    def update(kept, losses):
        rounds.append((torch.where(kept, 1.0, opt.options["suppression"]).double(), losses.clone()))
        return original(kept, losses)

    monkeypatch.setattr(opt.scheduler, "update", update)
    return rounds


@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize("probe_rows", [2, 0.5])
def test_probe_rows_losses_are_the_hand_probes_on_the_first_rows(mode, probe_rows, monkeypatch):
    """IST's rounds with probe_rows=k give exactly probe_losses on batch[:k], run by hand at the same weights."""
    model = tiny_peft_llama(dtype=torch.float64)
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1, probe_rows=probe_rows, probe_mode=mode, seed=0)
    rounds = recorded_rounds(opt, monkeypatch)
    for step in range(3):
        batch = lm_batch(batch=4, seed=step)
        model(**batch).loss.backward()
        opt.step()  # the probes run after the update, at the weights step() leaves
        opt.zero_grad()
        beta, got = rounds[-1]
        first = {k: v[:2] for k, v in batch.items()}  # 2 of 4 rows either way
        want = probe_losses(model, opt.adapters, beta, batch=((), first), mode=mode)
        assert torch.equal(got, want), (step, got, want)
        full = probe_losses(model, opt.adapters, beta, batch=((), batch), mode=mode)
        assert not torch.equal(got, full)  # the rows did matter
    assert opt.scheduler.num_updates == 3


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    """A user's model whose loss needs a target that is no forward input (set_loss_inputs)."""

    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x, scale):
        for block in self.blocks:
            x = block(x)
        return self.head(x) * scale


def loss_fn(output, x, scale, *, target, weights):
    return ((output[:, 0] - target) ** 2 * weights).mean()


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_probe_rows_cut_args_kwargs_and_loss_inputs_alike(mode, monkeypatch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay
    opt = IST(inner, model, probe_interval=1, probe_rows=3, probe_mode=mode, loss_fn=loss_fn, seed=0)
    rounds = recorded_rounds(opt, monkeypatch)
    x, target = torch.randn(6, 8), torch.randn(6)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # per-row: must be cut with the rows
    scale = torch.tensor(2.0)  # no batch dim: passes as it is
    out = model(x, scale=scale)
    loss_fn(out, x, scale, target=target, weights=weights).backward()
    opt.set_loss_inputs(target=target, weights=weights)
    opt.step()
    beta, got = rounds[-1]

    def by_hand(output, x, scale):
        return loss_fn(output, x, scale, target=target[:3], weights=weights[:3])

    want = probe_losses(
        model, opt.adapters, beta, batch=((x[:3],), {"scale": scale}), loss_fn=by_hand, mode="sequential"
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if mode == "sequential":
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize("probe_rows", [1.0, 4, 100])
def test_all_rows_is_todays_probe_bit_for_bit(mode, probe_rows, monkeypatch):
    """probe_rows=1.0 (default), a count equal to the batch or larger: the same importance and layers as no option."""
    runs = []
    for options in ({}, {"probe_rows": probe_rows}):
        model = tiny_peft_llama()
        opt = ISTAdamW(model, lr=1e-2, probe_interval=2, probe_mode=mode, seed=3, **options)
        selections = []
        for step in range(6):
            model(**lm_batch(batch=4, seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
            selections.append(opt.active_layers)
        runs.append((opt.scheduler.importance.clone(), selections, [p.detach().clone() for p in model.parameters()]))
    (imp_a, sel_a, params_a), (imp_b, sel_b, params_b) = runs
    assert opt.scheduler.num_updates == 3 and imp_a.abs().sum() > 0
    assert torch.equal(imp_a, imp_b) and sel_a == sel_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize("probe_rows", [1.0, 2])
def test_inference_mode_probes_match_no_grad_probes_bit_for_bit(mode, probe_rows, monkeypatch):
    """The inference_mode probes give the importance, selections and weights the no_grad probes gave."""
    runs = []
    for no_autograd in (torch.no_grad, torch.inference_mode):
        monkeypatch.setattr(probes_module, "_no_autograd", no_autograd)
        model = tiny_peft_llama(dropout=0.1)
        model.train()
        opt = ISTAdamW(model, lr=1e-2, probe_interval=1, probe_mode=mode, probe_rows=probe_rows, seed=1)
        selections, losses = [], []
        for step in range(5):
            torch.manual_seed(step)  # the same dropout masks in both runs
            loss = model(**lm_batch(batch=4, seed=step)).loss
            loss.backward()  # after an inference_mode round too: nothing it made met autograd
            losses.append(loss.detach())
            opt.step()
            opt.zero_grad()
            selections.append(opt.active_layers)
        assert not any(t.is_inference() for t in opt.hooks.probe_batch[1].values())
        runs.append((opt.scheduler.importance.clone(), selections, losses))
    (imp_a, sel_a, loss_a), (imp_b, sel_b, loss_b) = runs
    assert opt.scheduler.num_updates == 5 and imp_a.abs().sum() > 0
    assert torch.equal(imp_a, imp_b) and sel_a == sel_b
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))


def test_a_closure_still_runs_under_no_grad_not_inference_mode():
    model = tiny_peft_llama()
    seen = []

    def closure():
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return model(**lm_batch()).loss

    probe_losses(model, adapters_of(model), torch.ones(1, 4, dtype=torch.float64), closure=closure)
    assert seen == [(False, False)]


def test_row_counts_and_take_rows():
    assert [probe_row_count(v, 16) for v in (1, 4, 16, 40, 0.25, 0.01, 1.0, 0.5)] == [1, 4, 16, 16, 4, 1, 16, 8]
    assert probe_row_count(0.25, 6) == 2  # round(1.5) up, as layer fractions
    ids = torch.arange(12).view(4, 3)
    batch = ((ids,), {"mask": torch.ones(4, 3), "pos": torch.arange(3)[None], "nested": [ids], "n": 4})
    (args, kwargs), extra = take_rows(batch, {"target": torch.arange(4), "words": torch.arange(2)}, 2)
    assert (
        torch.equal(args[0], ids[:2]) and kwargs["mask"].shape == (2, 3) and torch.equal(kwargs["nested"][0], ids[:2])
    )
    assert kwargs["pos"].shape == (1, 3) and kwargs["n"] == 4  # no batch dim: unchanged
    assert torch.equal(extra["target"], torch.arange(2)) and torch.equal(extra["words"], torch.arange(2))
    assert take_rows(batch, {}, 1.0)[0] is batch and take_rows(batch, {}, 4)[0] is batch
    with pytest.raises(RuntimeError, match="probe_rows"):
        take_rows(((), {"n": 3}), {}, 2)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, "Invalid probe_rows: 0"),
        (-2, ValueError, "Invalid probe_rows"),
        (0.0, ValueError, r"\(0, 1\]"),
        (1.5, ValueError, r"\(0, 1\]"),
        (float("nan"), ValueError, "Invalid probe_rows"),
        (True, TypeError, "probe_rows must be an int count or a float fraction"),
        ("all", TypeError, "probe_rows must be"),
        (None, TypeError, "probe_rows must be"),
    ],
)
def test_bad_probe_rows_are_refused_at_construction(value, error, match):
    with pytest.raises(error, match=match):
        ISTAdamW(tiny_peft_llama(), probe_rows=value)


def test_probe_rows_numpy_numbers_become_python_numbers():
    np = pytest.importorskip("numpy")
    assert ISTAdamW(tiny_peft_llama(), probe_rows=np.int64(3)).options["probe_rows"] == 3
    opt = ISTAdamW(tiny_peft_llama(), probe_rows=np.float32(0.5))
    assert type(opt.options["probe_rows"]) is float and opt.options["probe_rows"] == 0.5
    assert "probe_rows=0.5" in repr(opt)


def test_probe_rows_is_checkpointed_and_older_checkpoints_load(tmp_path):
    model = tiny_peft_llama()
    opt = ISTAdamW(model, probe_interval=1, probe_rows=2, seed=0)
    model(**lm_batch(batch=4)).loss.backward()
    opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["ist"]["options"]["probe_rows"] == 2
    with pytest.warns(UserWarning, match=r"probe_rows: checkpoint 2, now 1.0"):
        ISTAdamW(tiny_peft_llama(), probe_interval=1, seed=0).load_state_dict(state)
    older = copy.deepcopy(state)
    del older["ist"]["options"]["probe_rows"]  # a checkpoint from before the option: loads quietly
    fresh = ISTAdamW(tiny_peft_llama(), probe_interval=1, probe_rows=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(older)
    assert torch.equal(fresh.scheduler.importance, opt.scheduler.importance) and fresh.num_steps == 1


def test_axolotl_config_field_reaches_the_option():
    from ist_optim.integrations.axolotl import IST_CONFIG_FIELDS, ISTArgs, ist_options_from_cfg

    assert IST_CONFIG_FIELDS["ist_probe_rows"] == "probe_rows"
    assert ist_options_from_cfg({"ist_probe_rows": 4, "ist_seed": None}) == {"probe_rows": 4}
    if ISTArgs is not None:
        assert ISTArgs(ist_probe_rows=0.25).ist_probe_rows == 0.25


def test_probe_forwards_run_under_inference_mode():
    seen = []
    model = tiny_peft_llama()

    def loss_fn(output, *args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return output.loss

    opt = ISTAdamW(model, lr=1e-2, probe_interval=1, loss_fn=loss_fn)
    model(**lm_batch()).loss.backward()
    opt.step()
    assert seen and all(seen)  # every probe forward, and only under inference_mode
