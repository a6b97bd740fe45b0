"""The seeds' own selection rules, exactly: LISA with its switch interval, and layer-wise LoRA with CKA.

LISA is checked against LMFlow's loop written out by hand (plain AdamW, the
sampled layers' ``requires_grad`` switched every ``K`` steps, embeddings and
head always on), bit for bit in full-parameter mode. Layer-wise CKA is checked
against the released code's computation on the pretrained model's
``output_hidden_states`` (last real token per sequence, linear CKA, lowest first).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import lm_batch, tiny_llama, tiny_peft_llama

from ist_optim import ISTAdamW, LayerwiseCKA, LISALayers
from ist_optim.policies import linear_cka

LR = 1e-2


# ---------------------------------------------------------------------- LISA
def lisa_schedule(num_layers: int, active: int, interval: int, seed: int, steps: int) -> list[list[int]]:
    """LMFlow's DynamicLayerActivationCallback: a uniform draw without replacement before steps 0, K, 2K, ..."""
    generator = torch.Generator().manual_seed(seed)
    schedule, current = [], []
    for step in range(steps):
        if step % interval == 0:
            current = sorted(torch.randperm(num_layers, generator=generator)[:active].tolist())
        schedule.append(current)
    return schedule


def test_lisa_switches_every_interval_steps_as_drawn_by_hand():
    policy = LISALayers(2, interval_steps=3, seed=7)
    policy.bind(6)
    seen = [policy.sample_active()]
    for _ in range(10):
        policy.after_step(None)
        seen.append(policy.sample_active())
    assert seen == lisa_schedule(6, 2, 3, seed=7, steps=11)
    assert len({tuple(s) for s in seen}) > 1  # it does switch
    assert all(seen[i] == seen[i - i % 3] for i in range(11))  # and holds for K steps
    policy.sample_active()  # a repeated call in the same step draws nothing new
    assert policy.active == seen[-1]


def test_lisa_full_parameter_equals_lmflows_loop_with_plain_adamw():
    """Full-parameter LISA: IST's selection, freezing and the wrapped AdamW against the hand loop, bit for bit."""
    steps, interval = 7, 3
    model = tiny_llama(num_layers=4)
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=LR, policy=LISALayers(2, interval_steps=interval, seed=5))
    plain = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0)  # ISTAdamW's default
    blocks = reference.model.layers
    selections = []
    for step, active in enumerate(lisa_schedule(4, 2, interval, seed=5, steps=steps)):
        selections.append(opt.active_layers)
        for index, block in enumerate(blocks):
            block.requires_grad_(index in active)  # embeddings, norm and head stay on: LISA trains them every step
        batch = lm_batch(seed=step)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        reference(**batch).loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        assert selections[-1] == active
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    embed = model.model.embed_tokens.weight
    assert not torch.equal(embed, tiny_llama(num_layers=4).model.embed_tokens.weight)  # the outside trained


def test_lisa_by_name_and_resume_mid_interval():
    opt = ISTAdamW(tiny_peft_llama(), lr=LR, policy="lisa", active_layers=2, seed=3)
    assert isinstance(opt.scheduler, LISALayers) and opt.scheduler.interval_steps == 20
    assert opt.scheduler.num_active == 2 and opt.options["policy"] == "lisa"

    def run(model, opt, steps):
        for step in steps:
            model(**lm_batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
        return opt.active_layers

    make = lambda: LISALayers(2, interval_steps=3, seed=11)  # noqa: E731
    model_a = tiny_peft_llama()
    opt_a = ISTAdamW(model_a, lr=LR, policy=make())
    run(model_a, opt_a, range(4))  # mid-interval: step 4 of [3, 6)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b = tiny_peft_llama(seed=1)
    model_b.load_state_dict(saved["model"])
    opt_b = ISTAdamW(model_b, lr=LR, policy=make())
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.active_layers == opt_a.active_layers
    assert run(model_a, opt_a, range(4, 9)) == run(model_b, opt_b, range(4, 9))
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name


def test_lisa_bad_settings():
    with pytest.raises(ValueError, match="interval_steps"):
        LISALayers(2, interval_steps=0)
    with pytest.raises(ValueError, match="active_layers"):
        ISTAdamW(tiny_peft_llama(), lr=LR, policy=LISALayers(9))


# ---------------------------------------------------------------------- layer-wise LoRA with CKA
def padded_batches():
    """Two calibration batches with right padding of different lengths (the released code pads right)."""
    batches = []
    for seed, lengths in ((0, (8, 5, 3)), (1, (6, 8, 2))):
        batch = lm_batch(batch=3, seq=8, seed=seed)
        for row, length in enumerate(lengths):
            batch["attention_mask"][row, length:] = 0
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return batches


def released_code_cka(batches, num_layers: int = 4) -> torch.Tensor:
    """select_layers_decoder.py on the pretrained model: hidden_states[i] vs [i+1] at each row's last real token.

    The released code takes the last block's output from hidden_states[-1] (after the final norm); IST takes
    the block's own output, so that one is read with a forward hook here.
    """
    pretrained = tiny_llama(num_layers)  # what tiny_peft_llama wraps (same seed), adapters not applied
    last_output = []
    pretrained.model.layers[-1].register_forward_hook(
        lambda module, args, output: last_output.append(output[0] if isinstance(output, tuple) else output)
    )
    features = [[] for _ in range(num_layers + 1)]
    with torch.no_grad():
        for batch in batches:
            hidden = pretrained(**batch, output_hidden_states=True).hidden_states
            last = batch["attention_mask"].sum(dim=1) - 1
            rows = torch.arange(last.numel())
            for i in range(num_layers):
                features[i].append(hidden[i][rows, last])
            features[num_layers].append(last_output[-1][rows, last])
    reps = [torch.cat(f) for f in features]
    return torch.stack([linear_cka(reps[i], reps[i + 1]) for i in range(num_layers)])


def test_layerwise_cka_is_the_released_codes_pretrained_input_output_cka():
    batches = padded_batches()
    model = tiny_peft_llama()  # B made non-zero: the adapted model differs from the pretrained one
    policy = LayerwiseCKA(batches, active_layers=0.5)
    opt = ISTAdamW(model, lr=LR, policy=policy)
    expected = released_code_cka(batches)
    torch.testing.assert_close(policy.cka, expected, rtol=1e-10, atol=1e-12)
    assert policy.num_rows == 6
    ranking = sorted(range(4), key=lambda i: (float(expected[i]), i))
    assert policy.ranking == ranking
    assert opt.active_layers == sorted(ranking[:2])  # floor(0.5 * 4) lowest-CKA blocks
    # The adapted model (adapters on) gives other values: what is measured is the pretrained model.
    with torch.no_grad():
        hidden = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    rows = [(torch.arange(3), b["attention_mask"].sum(dim=1) - 1) for b in batches]
    adapted = [torch.cat([h[i][r] for h, r in zip(hidden, rows)]) for i in range(3)]
    assert abs(float(linear_cka(adapted[0], adapted[1]) - expected[0])) > 1e-6


def test_layerwise_cka_selection_trains_only_its_layers_and_resumes():
    batches = padded_batches()
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=LR, policy=LayerwiseCKA(batches, active_layers=1))
    chosen = opt.active_layers
    assert len(chosen) == 1
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(3):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        assert opt.active_layers == chosen
    for name, p in model.named_parameters():
        if name in before:
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert torch.equal(p, before[name]) == (layer not in chosen), name
    state = opt.state_dict()
    again = ISTAdamW(tiny_peft_llama(), lr=LR, policy=LayerwiseCKA(batches, active_layers=1))
    again.load_state_dict(state)
    assert again.active_layers == chosen and again.scheduler.ranking == opt.scheduler.ranking


def test_layerwise_cka_takes_the_last_real_token_with_left_padding_too():
    right = padded_batches()
    left = []
    for batch in right:
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        for row in range(ids.shape[0]):  # the same tokens, moved to the end
            n = int(mask[row].sum())
            ids[row] = torch.cat([ids[row, n:], ids[row, :n]])
            mask[row] = torch.cat([mask[row, n:], mask[row, :n]])
        left.append({"input_ids": ids, "attention_mask": mask})
    a, b = LayerwiseCKA(right), LayerwiseCKA(left)
    ISTAdamW(tiny_peft_llama(), lr=LR, policy=a)
    ISTAdamW(tiny_peft_llama(), lr=LR, policy=b)
    # LLaMA's rotary positions shift with left padding, so the values are close, not equal; the rows compared
    # are the real tokens' (a padded position would give very different features).
    assert a.num_rows == b.num_rows == 6
    assert bool(torch.isfinite(b.cka).all()) and bool(((b.cka > 0) & (b.cka <= 1 + 1e-12)).all())


def test_layerwise_cka_bad_settings():
    with pytest.raises(ValueError, match="calibration batches"):
        LayerwiseCKA([])
    with pytest.raises(ValueError, match="tokens"):
        LayerwiseCKA(padded_batches(), tokens="first")
    with pytest.raises(TypeError, match="calibration batch"):
        ISTAdamW(tiny_peft_llama(), lr=LR, policy=LayerwiseCKA([3]))
    policy = LayerwiseCKA(padded_batches(), active_layers=0.1)
    ISTAdamW(tiny_peft_llama(), lr=LR, policy=policy)
    assert policy.num_active == 1 == max(1, math.floor(0.1 * 4))


def test_layerwise_cka_refuses_inits_that_rewrite_the_base_weights():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    )
    with pytest.raises(ValueError, match="pissa"):
        ISTAdamW(model, lr=LR, policy=LayerwiseCKA(padded_batches()))
