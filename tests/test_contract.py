"""The drop-in contract where it used to break: frozen weights, object life cycle, Trainer inputs, checkpoints."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import lm_batch, tiny_peft_llama
from torch import nn

from ist_optim import IST, ISTAdamW
from ist_optim.probes import probe_losses


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def train(model, opt, steps, seed=0):
    for step in range(steps):
        model(**lm_batch(seed=seed + step)).loss.backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------- frozen stays frozen
@pytest.mark.parametrize("build", ["sgd_all_params", "istadamw_all_params"])
def test_frozen_weights_in_the_optimizer_stay_frozen(build):
    model = tiny_peft_llama(num_layers=4)
    found = flags(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if build == "sgd_all_params":  # the README's own example
        opt = IST(torch.optim.SGD(model.parameters(), lr=0.1), model, active_layers=0.25)
    else:
        opt = ISTAdamW(model, lr=1e-2, active_layers=0.25, params=model.parameters())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    train(model, opt, 3)
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and torch.equal(p, frozen[name]), name
    opt.remove_hooks()
    assert flags(model) == found


# ---------------------------------------------------------------------------- object life cycle
def test_deepcopy_with_an_lr_scheduler_steps_the_copy():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1.0, num_probes=0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    copied = copy.deepcopy(opt)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    copied.model(**lm_batch()).loss.backward()
    copied.step()
    assert all(torch.equal(p, before[n]) for n, p in lora_params(model).items())  # the original did not move
    assert any(not torch.equal(p, before[n]) for n, p in lora_params(copied.model).items())
    assert copied.num_steps == 1 and opt.num_steps == 0


def test_pickle_with_an_lr_scheduler_round_trips_and_steps():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=0.5, probe_interval=1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    train(model, opt, 2)
    loaded = pickle.loads(pickle.dumps(opt))
    assert torch.equal(loaded.scheduler.importance, opt.scheduler.importance)
    assert loaded.active_layers == opt.active_layers
    train(loaded.model, loaded, 2)
    assert loaded.num_steps == 4 and opt.num_steps == 2


def test_a_deleted_optimizer_leaves_a_plain_model():
    model = tiny_peft_llama()
    found = flags(model)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1)
    train(model, opt, 1)
    assert flags(model) != found
    del opt
    gc.collect()
    assert flags(model) == found
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert len(plain.param_groups[0]["params"]) == len(lora_params(model))
    model(**lm_batch()).loss.backward()
    assert all(p.grad is not None for p in lora_params(model).values())


def test_a_deep_copied_model_trains_as_a_plain_model():
    model = tiny_peft_llama()
    found = flags(model)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, checkpoint_unselected=True)
    train(model, opt, 1)
    copied = copy.deepcopy(model)
    assert flags(copied) == found  # a plain AdamW built now sees every adapter
    copied(**lm_batch()).loss.backward()
    assert all(p.grad is not None for p in lora_params(copied).values())
    blocks = copied.get_base_model().model.layers
    assert not any(
        hook for m in copied.modules() for hook in m._forward_pre_hooks.values() if "ModelHooks" in repr(hook)
    )
    assert all("forward" not in block.__dict__ for block in blocks)
    train(model, opt, 1)  # the original still works
    assert opt.num_steps == 2


def test_remove_hooks_keeps_a_forward_patched_before_ist():
    model = tiny_peft_llama()
    block = model.get_base_model().model.layers[1]
    calls = []
    original = block.forward

    def patched(*args, **kwargs):  # e.g. accelerate's device hooks
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = patched
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, checkpoint_unselected=True)
    train(model, opt, 2)
    opt.remove_hooks()
    assert block.__dict__["forward"] is patched
    before = len(calls)
    model(**lm_batch())
    assert before >= 2 and len(calls) == before + 1


def test_a_compiled_model_is_refused_with_the_fix():
    model = tiny_peft_llama()
    with pytest.raises(TypeError, match="_orig_mod"):
        ISTAdamW(torch.compile(model), lr=1e-3)


# ---------------------------------------------------------------------------- probe inputs
def test_probe_batch_drops_num_items_in_batch_so_probe_losses_are_the_mean():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1)
    batch = lm_batch(batch=2, seq=8)
    model(**batch, num_items_in_batch=torch.tensor(28)).loss.backward()  # Trainer with accumulation 2
    assert "num_items_in_batch" not in opt.hooks.probe_batch[1]
    losses = probe_losses(model, opt.adapters, torch.ones(2, len(opt.layer_names)), batch=opt.hooks.probe_batch)
    with torch.no_grad():
        model.eval()
        mean_loss = model(**batch).loss
        model.train()
    torch.testing.assert_close(losses, torch.stack([mean_loss, mean_loss]).double(), rtol=1e-6, atol=0)


def test_no_labels_skips_the_importance_update_with_one_warning():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1)
    batch = lm_batch()
    labels = batch.pop("labels")
    with pytest.warns(UserWarning, match="importance is not updated.*loss=None"):
        for _ in range(2):  # as Trainer does with label_smoothing_factor: the loss is computed outside
            logits = model(**batch).logits
            nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
            opt.step()
            opt.zero_grad()
    assert opt.num_probe_updates_missed == 2 and opt.scheduler.num_updates == 0 and opt.num_steps == 2


def test_trainer_with_label_smoothing_runs_and_says_why_importance_stays(tmp_path):
    from test_trainer import make_trainer

    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=2e-2, active_layers=0.5, probe_interval=2)
    trainer = make_trainer(model, opt, tmp_path, max_steps=4)
    from transformers.trainer_pt_utils import LabelSmoother

    trainer.label_smoother = LabelSmoother(epsilon=0.1)  # what label_smoothing_factor=0.1 sets up
    with pytest.warns(UserWarning, match="importance is not updated"):
        trainer.train()
    assert opt.num_steps == 4 and opt.num_probe_updates_missed == 2


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = tiny_peft_llama()

    def forward(self, **batch):
        return (self.model(**batch).loss,)


def test_a_model_without_a_loss_field_fails_at_its_first_training_forward():
    model = TupleNet()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=5)
    with pytest.raises(TypeError, match="loss_fn"):
        model(**lm_batch())
    opt.loss_fn = lambda output, **batch: output[0]  # noqa: ARG005 (what the message asks for)
    ISTAdamW(model, lr=1e-2, probe_interval=1, loss_fn=lambda output, **batch: output[0])
    model(**lm_batch())[0].backward()


def test_torch_standard_closure_works_on_probe_steps():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=0.5, probe_interval=1)
    for step in range(3):
        batch = lm_batch(seed=step)

        def closure():
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert loss.requires_grad
    assert opt.scheduler.num_updates == 3


# ---------------------------------------------------------------------------- checkpoints
def test_load_state_dict_validates_before_changing_anything():
    model = tiny_peft_llama(num_layers=4)
    other = tiny_peft_llama(num_layers=4)
    source = ISTAdamW(other, lr=0.5, layers=other.get_base_model().model.layers[:3], num_probes=0)
    saved = source.state_dict()
    opt = ISTAdamW(
        model, lr=1e-2, num_probes=0, params=[{"params": [p for p in model.parameters() if p.requires_grad]}]
    )
    before = copy.deepcopy(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match="checkpoint is for 3 layers"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-2
    assert opt.optimizer.state_dict()["param_groups"] == before["param_groups"]


def test_options_are_checkpointed_and_a_difference_warns():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, suppression=0.25)
    saved = opt.state_dict()
    assert saved["ist"]["options"]["active_layers"] == 2
    other = ISTAdamW(tiny_peft_llama(), lr=1e-2, active_layers=3, suppression=0.5)
    with pytest.warns(UserWarning, match="active_layers: checkpoint 2, now 3.*suppression"):
        other.load_state_dict(saved)
    same = ISTAdamW(tiny_peft_llama(), lr=1e-2, active_layers=2, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        same.load_state_dict(saved)  # only the seed differs, and the loaded generator state replaces it


def test_state_dict_hooks_run():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert calls == ["save-pre", "save-post", "load-pre", "load-post"]


# ---------------------------------------------------------------------------- step hooks and AMP
def test_global_optimizer_step_hooks_fire_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, num_probes=0)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__))),
    ]
    try:
        train(model, opt, 2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("pre", "ISTAdamW"), ("post", "ISTAdamW")] * 2


def test_fused_adamw_under_grad_scaler_equals_plain_fused_adamw():
    model, reference = tiny_peft_llama(), tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1.0, num_probes=0, fused=True)
    ref_opt = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-2, fused=True, weight_decay=0.0
    )
    assert opt._step_supports_amp_scaling
    scaler, ref_scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0**16),
        torch.amp.GradScaler("cpu", init_scale=2.0**16),
    )
    for step in range(4):
        for m, o, s in ((model, opt, scaler), (reference, ref_opt, ref_scaler)):
            s.scale(m(**lm_batch(seed=step)).loss).backward()
            if step == 2:  # an overflow: the step must be skipped by both, and IST must not advance
                next(p for p in m.parameters() if p.grad is not None).grad[0] = float("inf")
            s.step(o)
            s.update()
            o.zero_grad()
    assert opt.num_steps == 3
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------- construction-time checks
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(importance_lr=float("inf")), "importance_lr"),
        (dict(importance_lr=float("nan")), "importance_lr"),
        (dict(suppression=1.0), "suppression"),
        (dict(kernels="triton", triton_interpret="0"), "kernels='triton'"),
    ],
)
def test_errors_known_at_construction_are_raised_there(options, match, monkeypatch):
    if "triton_interpret" in options:
        monkeypatch.setenv("TRITON_INTERPRET", options.pop("triton_interpret"))
    with pytest.raises(ValueError, match=match):
        ISTAdamW(tiny_peft_llama(), lr=1e-2, **options)


def test_suppression_one_is_fine_without_probes():
    ISTAdamW(tiny_peft_llama(), lr=1e-2, suppression=1.0, num_probes=0)


def test_numpy_integers_are_accepted():
    opt = ISTAdamW(
        tiny_peft_llama(),
        lr=1e-2,
        active_layers=np.int64(2),
        probe_layers=np.int32(2),
        num_probes=np.int64(2),
        probe_interval=np.int64(3),
        seed=np.int64(5),
    )
    assert opt.scheduler.num_active == 2 and opt.options["probe_interval"] == 3
    assert type(opt.state_dict()["ist"]["options"]["active_layers"]) is int


def test_batched_probes_without_a_per_candidate_loss_are_refused_at_construction():
    with pytest.raises(ValueError, match="batched"):
        ISTAdamW(TupleNet(), lr=1e-2, probe_mode="batched")


def test_batched_probes_accept_gpt2_lm_head_model():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0)
    model = get_peft_model(GPT2LMHeadModel(config).double(), LoraConfig(r=2, target_modules=["c_attn"]))
    opt = ISTAdamW(model, lr=1e-2, probe_mode="batched", probe_interval=1)
    batch = lm_batch()
    model(**batch).loss.backward()
    beta = torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 1.0, 0.25, 1.0]], dtype=torch.float64)
    batched = probe_losses(model, opt.adapters, beta, batch=opt.hooks.probe_batch, mode="batched")
    sequential = probe_losses(model, opt.adapters, beta, batch=opt.hooks.probe_batch, mode="sequential")
    torch.testing.assert_close(batched, sequential, rtol=1e-10, atol=1e-12)


def test_deepcopy_of_model_and_optimizer_together_in_either_order():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0)
    train(model, opt, 1)
    for pair in ((model, opt), (opt, model)):
        copied = copy.deepcopy(pair)
        copied_model, copied_opt = (copied[1], copied[0]) if isinstance(copied[0], ISTAdamW) else copied
        assert copied_opt.model is copied_model
        train(copied_model, copied_opt, 2)  # steps (no "hooks were removed") and trains its selection only
        assert copied_opt.num_steps == 3
        trainable = {n for n, p in copied_model.named_parameters() if p.requires_grad}
        selected = {
            n
            for n, p in copied_model.named_parameters()
            for i in copied_opt.active_layers
            if n.startswith(copied_opt.layer_names[i] + ".") and "lora_" in n
        }
        assert trainable == selected


# ---------------------------------------------------------------------------- seed and loss inputs
def selections(opt, model, steps):
    chosen = []
    for step in range(steps):
        chosen.append(opt.active_layers)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return chosen


def test_default_seed_follows_torch_manual_seed():
    runs = {}
    for name, seed in (("a", 1), ("again", 1), ("b", 2)):
        model = tiny_peft_llama(num_layers=8)  # (seeds torch itself)
        torch.manual_seed(seed)
        opt = ISTAdamW(model, lr=1e-2, active_layers=2, num_probes=0)
        assert opt.options["seed"] == seed
        runs[name] = selections(opt, model, 6)
    assert runs["a"] == runs["again"]
    assert runs["a"] != runs["b"]  # 7 draws of 2 of 8 layers: equal by chance with probability 28**-7
    torch.manual_seed(2)
    explicit = ISTAdamW(tiny_peft_llama(num_layers=8), lr=1e-2, active_layers=2, num_probes=0, seed=1)
    assert explicit.options["seed"] == 1  # an explicit seed wins over the global one


def _verbalizer_setup():
    """A loss over two label words at the last position, with targets that are no forward input."""
    words = torch.tensor([3, 7])

    def loss_fn(output, *args, target, **kwargs):
        return torch.nn.functional.cross_entropy(output.logits[:, -1, words], target)

    batches = [(lm_batch(seed=s)["input_ids"], torch.tensor([s % 2, 1 - s % 2])) for s in range(4)]
    return words, loss_fn, batches


def test_set_loss_inputs_reaches_the_probe_loss():
    words, loss_fn, batches = _verbalizer_setup()
    model = tiny_peft_llama(num_layers=4)
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1, importance_lr=100.0, loss_fn=loss_fn, seed=0)
    for ids, target in batches:
        out = model(input_ids=ids)
        torch.nn.functional.cross_entropy(out.logits[:, -1, words], target).backward()
        opt.set_loss_inputs(target=target)
        opt.step()
        opt.zero_grad()
    # Reference: the same run with each step's target baked into the loss function by hand.
    current = {}
    ref_opt = ISTAdamW(
        reference,
        lr=1e-2,
        probe_interval=1,
        importance_lr=100.0,
        seed=0,
        loss_fn=lambda output, *args, **kwargs: loss_fn(output, target=current["target"]),
    )
    for ids, target in batches:
        current["target"] = target
        out = reference(input_ids=ids)
        torch.nn.functional.cross_entropy(out.logits[:, -1, words], target).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.scheduler.num_updates == ref_opt.scheduler.num_updates == len(batches)
    assert opt.scheduler.importance.abs().max() > 0
    assert torch.equal(opt.scheduler.importance, ref_opt.scheduler.importance)


def test_loss_inputs_are_forgotten_after_each_step():
    words, loss_fn, batches = _verbalizer_setup()
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, probe_interval=2, loss_fn=loss_fn)
    ids, target = batches[0]
    opt.set_loss_inputs(target=target)
    model(input_ids=ids).logits.sum().backward()
    opt.step()  # no probe round at step 1: the target is dropped here
    model(input_ids=ids).logits.sum().backward()
    with pytest.raises(TypeError, match="target"):  # a stale target never meets a newer batch
        opt.step()


def test_set_loss_inputs_errors():
    words, loss_fn, batches = _verbalizer_setup()
    with pytest.raises(ValueError, match="loss_fn"):
        ISTAdamW(tiny_peft_llama(), lr=1e-2).set_loss_inputs(target=batches[0][1])
    ISTAdamW(tiny_peft_llama(), lr=1e-2, num_probes=0).set_loss_inputs(target=batches[0][1])  # dropped, no probes
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1, loss_fn=lambda out, *a, **kw: out.loss)
    model(**lm_batch()).loss.backward()
    opt.set_loss_inputs(labels=batches[0][1])
    with pytest.raises(ValueError, match="also keyword arguments"):
        opt.step()


# ---------------------------------------------------------------------------- the user's requires_grad
def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def test_freezing_and_unfreezing_mid_run_follows_the_plain_optimizer_bit_for_bit():
    """Every layer active, probes off: a user's freeze (and unfreeze) does to IST what it does to AdamW."""
    model = tiny_peft_llama(num_layers=4)
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-2, weight_decay=0.1, active_layers=1.0, num_probes=0)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ours, theirs = lora_params(model), lora_params(reference)
    one = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
    block = "base_model.model.model.layers.2.mlp.up_proj"

    def freeze(m, frozen):  # both ways users write it: the attribute and Module.requires_grad_
        dict(m.named_parameters())[one].requires_grad = not frozen
        m.get_submodule(block).requires_grad_(not frozen)

    for step in range(9):
        if step == 3:
            freeze(model, True)
            freeze(reference, True)
        if step == 6:
            freeze(model, False)
            freeze(reference, False)
        for m, o in ((model, opt), (reference, ref_opt)):
            m(**lm_batch(seed=step)).loss.backward()
            o.step()
            o.zero_grad()
        assert flags(model) == flags(reference), step
        for name, p in ours.items():
            assert torch.equal(p, theirs[name]), (step, name)
    moved = [name for name in ours if name == one or name.startswith(block + ".")]
    assert len(moved) == 3 and all(
        not torch.equal(ours[n], lora_params(tiny_peft_llama(num_layers=4))[n]) for n in moved
    )


def test_a_user_frozen_parameter_never_changes_under_sparse_selection():
    """Frozen while its layer is not selected (IST had it off already), and while it is: never trained again."""
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, weight_decay=0.1, active_layers=1, probe_interval=2)
    params = lora_params(model)
    unselected = next(i for i in range(4) if i not in opt.active_layers)
    selected = opt.active_layers[0]
    frozen = {n: p for n, p in params.items() if layer_of(n) == unselected and "q_proj" in n}
    frozen |= {n: p for n, p in params.items() if layer_of(n) == selected and "v_proj.lora_B" in n}
    assert not any(p.requires_grad for n, p in frozen.items() if layer_of(n) == unselected)
    for p in frozen.values():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in frozen.items()}
    chosen = set()
    for step in range(16):
        chosen.update(opt.active_layers)
        model(**lm_batch(seed=step)).loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in frozen.values()), step
        opt.step()
        opt.zero_grad()
    assert {unselected, selected} <= chosen  # both layers trained meanwhile, their frozen parameters did not
    assert opt.scheduler.num_updates == 8
    for name, p in frozen.items():
        assert torch.equal(p, before[name]), name
    assert set(map(id, opt.hooks.user_frozen)) == set(map(id, frozen.values()))
    for p in frozen.values():  # unfrozen: scheduled again, trained whenever its layer is selected
        p.requires_grad = True
    while not {unselected, selected} <= set(opt.active_layers) and opt.num_steps < 200:
        model(**lm_batch(seed=opt.num_steps)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not opt.hooks.user_frozen
    assert all(p.requires_grad == (layer_of(n) in opt.active_layers) for n, p in params.items())


def test_a_freeze_the_watch_cannot_see_is_still_seen_on_a_selected_parameter():
    """A write past the watched setter (C-level): seen because the flag differs from what IST last set."""
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0)
    name, p = next((n, p) for n, p in lora_params(model).items() if layer_of(n) == opt.active_layers[0])
    torch._C.TensorBase.requires_grad.__set__(p, False)
    before = p.detach().clone()
    for step in range(8):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not p.requires_grad and torch.equal(p, before), name


def test_watched_parameters_stay_parameters_and_get_their_class_back():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0)
    params = lora_params(model)
    p = next(iter(params.values()))
    assert isinstance(p, nn.Parameter) and type(p).__name__ == "Parameter" and type(p) is not nn.Parameter
    buffer = io.BytesIO()
    torch.save(model, buffer)  # pickles as plain parameters
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(type(q) is nn.Parameter for q in loaded.parameters())
    p.requires_grad_(False)  # a user freeze survives remove_hooks; everything else is restored
    opt.remove_hooks()
    assert all(type(q) is nn.Parameter for q in model.parameters())
    assert all(q.requires_grad == (q is not p) for q in params.values())


def test_torch_compile_trains_the_watched_parameters_like_eager():
    """The requires_grad watch re-classes parameters: torch.compile must still trace them (a property did not)."""
    from torch import nn

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        model = nn.Sequential(*blocks)
        opt = ISTAdamW(model, lr=1e-2, layers=blocks, active_layers=2, num_probes=0, seed=0)
        forward = torch.compile(model, backend="eager") if compiled else model
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            forward(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert type(blocks[0].weight).__name__ == "Parameter" and type(blocks[0].weight) is not nn.Parameter
        return [p.detach().clone() for p in model.parameters()]

    for got, expected in zip(run(True), run(False)):
        torch.testing.assert_close(got, expected)


def test_an_unselected_parameter_turned_on_is_off_again_at_once():
    """peft's disable_adapter() exit turns every adapter on; a checkpointed block recomputed in this step's
    backward must see the flags its forward saw, so the write is undone at once, not at the next forward."""
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1)
    off = [p for i, ps in enumerate(opt.layer_map.params) if i not in opt.active_layers for p in ps]
    on = [p for i in opt.active_layers for p in opt.layer_map.params[i]]
    assert off and not any(p.requires_grad for p in off)
    off[0].requires_grad_(True)
    off[1].requires_grad = True
    assert not off[0].requires_grad and not off[1].requires_grad and opt.hooks.user_frozen == []
    on[0].requires_grad_(False)  # a user's freeze still sticks
    assert not on[0].requires_grad and opt.hooks.user_frozen == [on[0]]
