"""IST / ISTAdamW against plain torch optimizers, and the drop-in contracts (DESIGN.md section 3)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama
from torch import nn

from ist_optim import IST, ISTAdamW


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def layer_of_name(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def train_steps(model, opt, sched=None, steps=20, accumulation=2, seed=0, closure=False):
    for step in range(steps):
        if closure:

            def closure_fn(step=step):
                loss = model(**lm_batch(seed=seed + step)).loss
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            opt.step(closure_fn)
        else:
            for micro in range(accumulation):
                loss = model(**lm_batch(seed=seed + 100 * step + micro)).loss / accumulation
                loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def test_all_layers_active_equals_adamw_bit_for_bit():
    """active_layers=1.0 and no probes: the wrapper is AdamW (weight decay, LR schedule, accumulation)."""
    model = tiny_peft_llama()
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-2, weight_decay=0.1, active_layers=1.0, num_probes=0)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=20)
    train_steps(model, opt, sched, steps=22)
    train_steps(reference, ref_opt, ref_sched, steps=22)
    for (name, p), q in zip(lora_params(model).items(), lora_params(reference).values()):
        assert torch.equal(p, q), name
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    for p, q in zip(opt.optimizer.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key])


def test_ist_wraps_sgd_with_momentum_equal_to_sgd():
    model = tiny_peft_llama()
    reference = copy.deepcopy(model)
    make = lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)  # noqa: E731
    opt = IST(make(model), model, active_layers=1.0, num_probes=0)
    ref_opt = make(reference)
    train_steps(model, opt, steps=5)
    train_steps(reference, ref_opt, steps=5)
    for p, q in zip(lora_params(model).values(), lora_params(reference).values()):
        assert torch.equal(p, q)


def test_shares_param_groups_and_state_with_the_wrapped_optimizer():
    model = tiny_peft_llama()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt = IST(inner, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state


def test_unselected_layers_get_no_grad_no_update_no_optimizer_step():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, weight_decay=0.1, active_layers=1, num_probes=0)
    params = lora_params(model)
    for step in range(8):
        active = opt.active_layers
        before = {n: p.detach().clone() for n, p in params.items()}
        steps_before = {n: int(opt.state[p]["step"]) if p in opt.state else 0 for n, p in params.items()}
        model(**lm_batch(seed=step)).loss.backward()
        for name, p in params.items():
            if layer_of_name(name) in active:
                assert p.grad is not None, name
            else:
                assert p.grad is None, name
        opt.step()
        for name, p in params.items():
            steps_after = int(opt.state[p]["step"]) if p in opt.state else 0
            if layer_of_name(name) in active:
                assert steps_after == steps_before[name] + 1
            else:
                assert torch.equal(p, before[name]), name  # not even weight decay
                assert steps_after == steps_before[name]
        opt.zero_grad()


def test_zeroed_instead_of_none_grads_still_do_not_move_frozen_layers():
    """zero_grad(set_to_none=False) leaves zero tensors; AdamW would step them (momentum, decay)."""
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, weight_decay=0.1, active_layers=1, num_probes=0, seed=1)
    params = lora_params(model)
    for step in range(6):
        active = opt.active_layers
        before = {n: p.detach().clone() for n, p in params.items()}
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        for name, p in params.items():
            if layer_of_name(name) not in active:
                assert torch.equal(p, before[name]), name


def test_selection_is_fixed_across_micro_batches_and_reapplied_after_requires_grad_reset():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, num_probes=0)
    active = opt.active_layers
    for micro in range(3):
        for p in lora_params(model).values():  # e.g. peft or a user resetting trainability
            p.requires_grad_(True)
        model(**lm_batch(seed=micro)).loss.backward()
        assert opt.active_layers == active
        grads = {layer_of_name(n) for n, p in lora_params(model).items() if p.grad is not None}
        assert grads == set(active)
    opt.step()


def test_selection_changes_only_at_step_and_all_layers_get_picked():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-3, active_layers=1, num_probes=0)
    seen = set()
    for step in range(30):
        seen.update(opt.active_layers)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert seen == {0, 1, 2, 3}


def test_head_outside_blocks_trains_every_step():
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_llama

    model = get_peft_model(
        tiny_llama(4),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0)
    head = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert head and all(any(p is q for q in opt.layer_map.other_params) for p in head)
    for step in range(3):
        before = [p.detach().clone() for p in head]
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        assert all(not torch.equal(p, b) for p, b in zip(head, before))


def test_remove_hooks_restores_trainability_and_stops_toggling():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-3, active_layers=1, num_probes=0)
    model(**lm_batch()).loss.backward()
    assert any(not p.requires_grad for p in lora_params(model).values())
    opt.remove_hooks()
    assert all(p.requires_grad for p in lora_params(model).values())
    model(**lm_batch()).loss.backward()
    assert all(p.grad is not None for p in lora_params(model).values())


def test_lr_scheduler_grad_scaler_clip_and_step_hooks_work():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=0.5, probe_interval=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for step in range(4):
        loss = model(**lm_batch(seed=step)).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
    assert calls == ["pre", "post"] * 4
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    h1.remove()
    h2.remove()
    assert opt.num_steps == 4 and opt.scheduler.num_updates == 2


def test_closure_step_trains_and_drives_probes():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=0.5, probe_interval=2)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    train_steps(model, opt, steps=4, closure=True)
    assert opt.scheduler.num_updates == 2
    assert not torch.equal(opt.scheduler.importance, torch.zeros(4))
    assert any(not torch.equal(p, before[n]) for n, p in lora_params(model).items())


def test_probes_without_any_forward_warn_once_and_skip():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1)
    with pytest.warns(UserWarning, match="no training forward"):
        opt.step()
    opt.step()
    assert opt.num_probe_updates_missed == 2 and opt.scheduler.num_updates == 0


def test_eval_forwards_are_not_captured_as_probe_batch():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1)
    train = lm_batch(seed=1)
    model(**train).loss.backward()
    model.eval()
    with torch.no_grad():
        model(**lm_batch(seed=2))
    model.train()
    assert opt.hooks.probe_batch[1]["input_ids"] is train["input_ids"]


@pytest.mark.parametrize("rule", ["reference", "paper"])
@pytest.mark.parametrize("probe_mode", ["sequential", "batched"])
def test_resume_from_state_dict_is_bit_identical(rule, probe_mode):
    """Save at step k, load into a fresh optimizer on a fresh model copy; 10 more steps match exactly."""
    model = tiny_peft_llama(num_layers=4)
    options = dict(
        lr=1e-2,
        weight_decay=0.05,
        active_layers=0.5,
        probe_interval=3,
        rule=rule,
        probe_mode=probe_mode,
        importance_lr=100.0,
        seed=4,
    )
    opt = ISTAdamW(model, **options)
    train_steps(model, opt, steps=7, accumulation=1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = tiny_peft_llama(num_layers=4, seed=77)  # fresh model, weights from the checkpoint
    resumed_model.load_state_dict(model.state_dict())
    resumed = ISTAdamW(resumed_model, **{**options, "seed": 123})
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.active_layers == opt.active_layers
    train_steps(model, opt, steps=10, accumulation=1, seed=1000)
    train_steps(resumed_model, resumed, steps=10, accumulation=1, seed=1000)
    assert opt.scheduler.num_updates >= 5
    assert torch.equal(opt.scheduler.importance, resumed.scheduler.importance)
    assert opt.active_layers == resumed.active_layers
    for p, q in zip(lora_params(model).values(), lora_params(resumed_model).values()):
        assert torch.equal(p, q)
    for p, q in zip(opt.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        assert opt.state[p].keys() == resumed.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], resumed.state[q][key])


def test_deepcopy_gives_an_independent_optimizer_that_trains_identically():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=0.5, probe_interval=2)
    train_steps(model, opt, steps=3, accumulation=1)
    opt_copy = copy.deepcopy(opt)
    model_copy = opt_copy.model
    assert model_copy is not model
    assert opt_copy.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]
    train_steps(model, opt, steps=4, accumulation=1, seed=50)
    train_steps(model_copy, opt_copy, steps=4, accumulation=1, seed=50)
    assert torch.equal(opt.scheduler.importance, opt_copy.scheduler.importance)
    for p, q in zip(lora_params(model).values(), lora_params(model_copy).values()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_a_checkpoint_of_other_layers():
    opt = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-3)
    model = tiny_peft_llama(num_layers=4)  # same param groups (torch's size check passes), other layer names
    other = ISTAdamW(model, lr=1e-3, layers=list(model.base_model.model.model.layers)[::-1])
    with pytest.raises(ValueError, match="checkpoint is for"):
        opt.load_state_dict(other.state_dict())


def test_state_dict_keeps_wrapper_keys_out_of_per_parameter_state():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=0.5, probe_interval=1)
    train_steps(model, opt, steps=2, accumulation=1)
    state_dict = opt.state_dict()
    assert set(state_dict) == {"state", "param_groups", "ist"}
    for entry in state_dict["state"].values():
        assert set(entry) <= {"step", "exp_avg", "exp_avg_sq"}
    assert set(state_dict["param_groups"][0]) == set(
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).state_dict()["param_groups"][0]
    )


# ---------------------------------------------------------------------------- bad input
class NoLists(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(active_layers=0), ValueError, "active_layers"),
        (dict(active_layers=5), ValueError, "active_layers"),
        (dict(active_layers=2.0), ValueError, "active_layers"),
        (dict(probe_layers=9), ValueError, "probe_layers"),
        (dict(probe_layers=0.0), ValueError, "probe_layers"),
        (dict(suppression=-0.1), ValueError, "suppression"),
        (dict(suppression=1.5), ValueError, "suppression"),
        (dict(importance_lr=-1.0), ValueError, "importance_lr"),
        (dict(probe_interval=-1), ValueError, "probe_interval"),
        (dict(probe_interval=2.5), ValueError, "probe_interval"),
        (dict(rule="bandit"), ValueError, "rule"),
        (dict(probe_mode="parallel"), ValueError, "probe_mode"),
        (dict(num_probes=-2), ValueError, "num_probes"),
        (dict(loss_fn="mse"), TypeError, "loss_fn"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-3, **kwargs)


def test_model_without_block_params_names_what_was_searched():
    with pytest.raises(ValueError, match=r"searched 0 nn.ModuleList"):
        ISTAdamW(NoLists(), lr=1e-3)


def test_model_without_trainable_params_raises():
    model = tiny_peft_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ISTAdamW(model, lr=1e-3)


def test_optimizer_without_any_adapter_param_raises():
    model = tiny_peft_llama()
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="no trainable"):
        IST(torch.optim.SGD([stray], lr=0.1), model)


def test_wrong_types_raise_type_error():
    model = tiny_peft_llama()
    with pytest.raises(TypeError, match="optimizer"):
        IST("adamw", model)
    with pytest.raises(TypeError, match="model"):
        IST(torch.optim.SGD(model.parameters(), lr=0.1), "model")
    opt = ISTAdamW(model, lr=1e-3)
    with pytest.raises(TypeError, match="already"):
        IST(opt, model)


def test_second_wrapper_on_the_same_model_replaces_the_first_with_a_warning():
    model = tiny_peft_llama()
    first = ISTAdamW(model, lr=1e-3, active_layers=1)
    assert sum(p.requires_grad for p in lora_params(model).values()) < len(lora_params(model))
    with pytest.warns(UserWarning, match="already carried an IST"):
        second = ISTAdamW(model, lr=1e-3, active_layers=1)
    # the second one saw every adapter as trainable, although the first had frozen most of them
    assert sum(len(params) for params in second.layer_map.params) == len(lora_params(model))
    with pytest.raises(RuntimeError, match="hooks were removed"):
        first.step()
    model(**lm_batch()).loss.backward()
    second.step()


# ---------------------------------------------------------------------------- optimizers whose step needs the closure
def lbfgs_closure(model, opt, batch, calls):
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_with_every_layer_active_equals_plain_lbfgs_bit_for_bit(line_search_fn):
    """The closure reaches LBFGS, which calls it several times per step; probes run once per step, move nothing."""
    model = tiny_peft_llama()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=0.5, max_iter=4, history_size=3, line_search_fn=line_search_fn)
    opt = IST(
        torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], **kwargs),
        model,
        active_layers=1.0,
        probe_interval=1,
    )
    ref_opt = torch.optim.LBFGS([p for p in reference.parameters() if p.requires_grad], **kwargs)
    calls, ref_calls = [], []
    for step in range(3):
        loss = opt.step(lbfgs_closure(model, opt, lm_batch(seed=step), calls))
        ref_loss = ref_opt.step(lbfgs_closure(reference, ref_opt, lm_batch(seed=step), ref_calls))
        assert torch.equal(loss, ref_loss)
        for (name, p), q in zip(lora_params(model).items(), lora_params(reference).values()):
            assert torch.equal(p, q), (step, name)
    assert len(calls) == len(ref_calls) > 3  # several forwards and backwards per step, the same ones
    assert opt.num_steps == 3 and opt.scheduler.num_updates == 3


def test_lbfgs_under_sparse_selection_is_refused_with_the_reason():
    model = tiny_peft_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="LBFGS keeps one flat curvature history"):
        IST(torch.optim.LBFGS(params), model, active_layers=0.5)
    from ist_optim import FixedLayers

    IST(torch.optim.LBFGS(params), model, policy=FixedLayers(range(4)), num_probes=0)  # every layer: accepted


class TwoLookSGD(torch.optim.Optimizer):
    """A SAM-like optimizer whose step needs the closure: two gradient evaluations, then the mean step, with decay.

    Like every torch optimizer it steps the parameters that have a gradient (a zero one too: decay moves them).
    """

    def __init__(self, params, lr, weight_decay=0.5):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        first = {p: p.grad.clone() for p in params}
        for p in params:
            p.add_(first[p], alpha=-0.05)  # look ahead along the first gradient
        with torch.enable_grad():
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p in first:
                    p.add_(first[p], alpha=0.05)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(first[p] + p.grad, alpha=-group["lr"] / 2)
        return loss


def test_a_closure_optimizer_under_sparse_selection_equals_it_on_the_layers_frozen_by_hand():
    """Each closure call trains the step's layers only: the unselected get no gradient (None) and no update."""
    from ist_optim import FixedLayers

    model = tiny_peft_llama(num_layers=4)
    reference = copy.deepcopy(model)
    opt = IST(
        TwoLookSGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        model,
        policy=FixedLayers([1, 3]),
        num_probes=0,
    )
    trainable = [p for p in reference.parameters() if p.requires_grad]
    for name, p in lora_params(reference).items():
        p.requires_grad_(layer_of_name(name) in (1, 3))
    ref_opt = TwoLookSGD(trainable, lr=0.1)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}

    def closure(m, o, batch):
        def evaluate():
            o.zero_grad(set_to_none=False)  # the stale grads of every layer become zeros, not None
            loss = m(**batch).loss
            loss.backward()
            return loss

        return evaluate

    for step in range(3):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step(closure(model, opt, lm_batch(seed=step)))
        ref_opt.step(closure(reference, ref_opt, lm_batch(seed=step)))
    for (name, p), q in zip(lora_params(model).items(), lora_params(reference).values()):
        assert torch.equal(p, q), name
        assert torch.equal(p, before[name]) == (layer_of_name(name) not in (1, 3)), name
