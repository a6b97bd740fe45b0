"""Policies that look at the model (CKA, gradient norm), the OwLore helper, and outside_layers.

Each test plants what its policy's definition measures and checks that the
policy finds it; resume tests train two copies in lockstep after a
``weights_only`` round trip, with eviction, the backward cut and selective
checkpointing on.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import lm_batch, tiny_llama, tiny_peft_llama
from torch import nn

from ist_optim import (
    CKALayers,
    GradNormLayers,
    ISTAdamW,
    LayerPolicy,
    LayerwiseCKA,
    LISALayers,
    SafeImportance,
    SpreadLayers,
    WeightedLayers,
    outlier_ratios,
)
from ist_optim.policies import linear_cka


def layer_of(name: str) -> int | None:
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


def train(model, opt, steps: range) -> list[list[int]]:
    selections = []
    for step in steps:
        selections.append(opt.active_layers)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return selections


# ---------------------------------------------------------------------- CKA
def planted_cka_run(**options):
    """LoRA on 4 layers; only layers 0 and 2 move in the warm-up (lr 0 elsewhere)."""
    model = tiny_peft_llama(num_layers=4, dtype=torch.float64)
    moving = [p for n, p in model.named_parameters() if p.requires_grad and layer_of(n) in (0, 2)]
    still = [p for n, p in model.named_parameters() if p.requires_grad and layer_of(n) in (1, 3)]
    policy = CKALayers(active_layers=2, warmup_steps=4, num_batches=2)
    opt = ISTAdamW(
        model, params=[{"params": moving, "lr": 0.05}, {"params": still, "lr": 0.0}], policy=policy, **options
    )
    return model, opt, policy


def test_cka_ranks_the_layers_a_planted_warmup_changed():
    model, opt, policy = planted_cka_run()
    selections = train(model, opt, range(4))
    assert selections == [[0, 1, 2, 3]] * 4  # the warm-up trains every layer
    assert policy.num_measured == 2 and policy.frozen is None
    # Layers 1 and 3 did not move: fed the same input, frozen and trained blocks agree exactly. Their outputs
    # in the model did change (layers 0 and 2 below them moved), so a measure without the shared input would
    # not give 1 here.
    torch.testing.assert_close(policy.cka[[1, 3]], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((policy.cka[[0, 2]] < 1 - 1e-6).all()), policy.cka
    assert sorted(policy.ranking[:2]) == [0, 2]
    assert opt.active_layers == [0, 2]
    for group in opt.param_groups:
        group["lr"] = 0.05
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert train(model, opt, range(4, 7)) == [[0, 2]] * 3  # fixed from then on
    moved = {layer_of(n) for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == {0, 2}


def test_cka_score_is_linear_cka_of_the_frozen_and_trained_block_on_the_same_input():
    model = tiny_peft_llama(num_layers=2, dtype=torch.float64)
    frozen = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=0.05, policy=CKALayers(1, warmup_steps=2, num_batches=1))
    train(model, opt, range(2))
    # By hand on the last warm-up batch: the trained model's input to block 1, through both versions of block 1.
    seen = {}
    block = model.base_model.model.model.layers[1]
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    out = {}
    hook = block.register_forward_hook(lambda m, a, o: out.update(trained=o[0] if isinstance(o, tuple) else o))
    model.eval()
    with torch.no_grad():
        model(**lm_batch(seed=1), use_cache=False)  # (a KV cache would make the second call attend to the first)
        handle.remove()
        hook.remove()
        old = frozen.base_model.model.model.layers[1](*seen["args"], **seen["kwargs"])
        old = old[0] if isinstance(old, tuple) else old
    expected = linear_cka(old.reshape(-1, old.shape[-1]), out["trained"].reshape(-1, old.shape[-1]))
    torch.testing.assert_close(opt.scheduler.cka[1], expected, rtol=0, atol=1e-12)


def test_linear_cka_matches_its_formula_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = x @ torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0] * 3.0 + 1.0
    torch.testing.assert_close(linear_cka(x, y), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    z = torch.randn(50, 8, generator=g, dtype=torch.float64)
    xc, zc = x - x.mean(0), z - z.mean(0)
    expected = (zc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (zc.T @ zc).norm())
    torch.testing.assert_close(linear_cka(x, z), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(linear_cka(x[:5], z[:5]), linear_cka(x[:5].clone(), z[:5].clone()))  # Gram path
    xs, zs = x[:5], z[:5]
    xs, zs = xs - xs.mean(0), zs - zs.mean(0)
    gram = (zs.T @ xs).norm() ** 2 / ((xs.T @ xs).norm() * (zs.T @ zs).norm())
    torch.testing.assert_close(linear_cka(x[:5], z[:5]), gram, rtol=1e-12, atol=0)


def test_cka_by_name_and_bad_settings():
    opt = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy="cka", active_layers=0.5)
    assert isinstance(opt.scheduler, CKALayers) and opt.scheduler.num_active == 2
    assert opt.scheduler.warmup_steps == 20 and opt.active_layers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_batches"):
        CKALayers(warmup_steps=2, num_batches=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        CKALayers(warmup_steps=0)
    with pytest.raises(ValueError, match="modules"):
        ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy="cka", layer_of=layer_of, backward_cut=False)


# ---------------------------------------------------------------------- gradient norm
def test_gradnorm_ranks_a_layer_with_a_planted_large_gradient_first():
    model = tiny_peft_llama(num_layers=4, dtype=torch.float64)
    for name, p in model.named_parameters():
        if p.requires_grad and layer_of(name) == 2:
            p.register_hook(lambda g: g * 50.0)
    policy = GradNormLayers(active_layers=1, interval=3, temperature=1.0, seed=0)
    opt = ISTAdamW(model, lr=1e-2, policy=policy)
    assert opt.active_layers == [0, 1, 2, 3]  # step 0 scores every layer
    model(**lm_batch()).loss.backward()
    # The definition, by hand, from the gradients before the update.
    rms = torch.stack(
        [
            torch.cat([p.grad.reshape(-1) for p in params]).norm() / math.sqrt(sum(p.numel() for p in params))
            for params in opt.layer_map.params
        ]
    )
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(policy.scores, rms, rtol=1e-12, atol=0)
    assert int(policy.scores.argmax()) == 2
    expected = torch.softmax(rms / rms.mean(), dim=0)
    torch.testing.assert_close(policy.probabilities(), expected, rtol=1e-12, atol=0)
    frequency = torch.zeros(4, dtype=torch.float64)
    for _ in range(4000):
        frequency[policy.sample_active()] += 1
    assert torch.allclose(frequency / 4000, expected, atol=0.03), (frequency / 4000, expected)
    # Schedule: steps 1 and 2 sample one layer, step 3 scores all again.
    selections = train(model, opt, range(1, 4))
    assert [len(s) for s in selections] == [1, 1, 4] and policy.num_scored == 2
    assert opt.active_layers != [0, 1, 2, 3]


def test_gradnorm_temperature_and_seed():
    policy = GradNormLayers(active_layers=1, temperature=0.5, seed=0)
    policy.bind(3)
    policy.scores = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        policy.probabilities(),
        torch.softmax(torch.tensor([1.0, 2.0, 3.0]).double() / (0.5 * 2.0), 0),
        rtol=1e-12,
        atol=0,
    )
    # seed=None follows IST's seed (itself torch.initial_seed() by default), for objects and for "gradnorm"
    draws = []
    for seed, policy in ((3, GradNormLayers(1)), (3, "gradnorm"), (4, GradNormLayers(1)), (None, GradNormLayers(1))):
        model = tiny_peft_llama(num_layers=4)  # (seeds the global RNG itself)
        torch.manual_seed(4)
        opt = ISTAdamW(model, lr=1e-2, policy=policy, active_layers=1, seed=seed)
        opt.scheduler.num_steps = 1  # between scoring steps: draws from the (uniform, unscored) softmax
        draws.append([opt.scheduler.sample_active()[0] for _ in range(20)])
    assert draws[0] == draws[1] != draws[2] == draws[3]
    with pytest.raises(ValueError, match="temperature"):
        GradNormLayers(temperature=0.0)
    with pytest.raises(ValueError, match="interval"):
        GradNormLayers(interval=0)


def test_a_non_finite_gradient_norm_round_is_skipped():
    policy = GradNormLayers(active_layers=1, seed=0)
    policy.bind(2)
    policy.observe_gradients(torch.tensor([1.0, math.inf]))
    assert policy.num_skipped == 1 and policy.num_scored == 0 and torch.equal(policy.scores, torch.zeros(2).double())


# ---------------------------------------------------------------------- resume, with the other options
RESUMABLE = {
    "cka-mid-measurement": (lambda: CKALayers(2, warmup_steps=4, num_batches=2), 3),
    "cka-after-ranking": (lambda: CKALayers(2, warmup_steps=2, num_batches=2), 3),
    "gradnorm": (lambda: GradNormLayers(1, interval=3, seed=7), 4),
    "weighted": (lambda: WeightedLayers([1.0, 2.0, 3.0, 4.0], 2, seed=5), 3),
    "lisa-mid-interval": (lambda: LISALayers(2, interval_steps=3, seed=5), 4),
    "safe": (lambda: SafeImportance(1, gamma=0.3, seed=5), 5),
    "spread": (lambda: SpreadLayers(2, seed=5), 3),
}


@pytest.mark.parametrize(
    "options",
    [
        dict(state_policy="drop"),
        dict(state_policy="offload", checkpoint_unselected=True),
    ],
    ids=["drop", "offload-checkpoint-unselected"],
)
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_policy_resumes_exactly_with_the_other_options(name, options):
    make, split = RESUMABLE[name]
    model = tiny_peft_llama(num_layers=4, dtype=torch.float64)
    model.enable_input_require_grads()  # the backward cut still applies (input embeddings' output is exempt)
    opt = ISTAdamW(model, lr=1e-2, policy=make(), **options)
    train(model, opt, range(split))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    weights = copy.deepcopy(model.state_dict())
    selections = train(model, opt, range(split, split + 5))
    assert len({tuple(s) for s in selections}) > 1 or name.startswith("cka")
    assert opt.memory_report()["backward_cuts"] > 0

    resumed_model = tiny_peft_llama(num_layers=4, dtype=torch.float64)
    resumed_model.load_state_dict(weights)
    resumed_model.enable_input_require_grads()
    resumed = ISTAdamW(resumed_model, lr=1e-2, policy=make(), **options)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert train(resumed_model, resumed, range(split, split + 5)) == selections
    for (n, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), n
    if name.startswith("cka"):
        assert torch.equal(resumed.scheduler.cka, opt.scheduler.cka) and opt.scheduler.ranked
    if name == "gradnorm":
        assert torch.equal(resumed.scheduler.scores, opt.scheduler.scores)


def test_a_bad_cka_state_is_refused_before_anything_changes():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, policy=CKALayers(2, warmup_steps=4, num_batches=2))
    train(model, opt, range(1))
    saved = opt.state_dict()
    del saved["ist"]["scheduler"]["frozen"]
    other = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy=CKALayers(2, warmup_steps=4, num_batches=2))
    state_before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="frozen"):
        other.load_state_dict(saved)
    assert other.num_steps == 0 and other.scheduler.num_steps == 0 and not other.optimizer.state
    assert other.state_dict()["ist"]["scheduler"]["num_steps"] == state_before["ist"]["scheduler"]["num_steps"]
    gradnorm = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy="gradnorm")
    with pytest.raises(ValueError, match="policy"):
        gradnorm.load_state_dict(opt.state_dict())


class OnlyBind(LayerPolicy):
    """A user's policy written before the optional callbacks existed: bind and sample_active only."""

    def bind(self, num_layers):
        self.num_layers = num_layers

    def sample_active(self):
        self.active = [0]
        return [0]


def test_a_user_policy_without_the_optional_callbacks_still_works():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, policy=OnlyBind())
    assert train(model, opt, range(2)) == [[0], [0]]


# ---------------------------------------------------------------------- OwLore outlier ratios
def test_outlier_ratios_follow_the_owl_definition():
    g = torch.Generator().manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16)) for _ in range(3))
    with torch.no_grad():
        for block in blocks:
            for linear in block:
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
        blocks[1][0].weight[:2] *= 20.0  # planted outliers in block 1
    by_hand = []
    for block in blocks:
        flat = torch.cat([linear.weight.detach().abs().double().reshape(-1) for linear in block])
        by_hand.append(float((flat > 3.0 * flat.mean()).double().mean()))
    ratios = outlier_ratios(blocks, threshold=3.0)
    assert ratios.tolist() == by_hand
    assert int(ratios.argmax()) == 1
    # with input-activation norms (Wanda's score)
    # names relative to each block, as its named_modules() gives them
    per_block = [{"0": torch.rand(16, generator=g), "1": torch.rand(8, generator=g)} for _ in range(3)]
    weighted = torch.stack(
        [outlier_ratios([block], threshold=3.0, activation_norms=n)[0] for block, n in zip(blocks, per_block)]
    )
    for i, block in enumerate(blocks):
        flat = torch.cat(
            [
                (block[0].weight.detach().abs().double() * per_block[i]["0"].double()[None, :]).reshape(-1),
                (block[1].weight.detach().abs().double() * per_block[i]["1"].double()[None, :]).reshape(-1),
            ]
        )
        assert float(weighted[i]) == float((flat > 3.0 * flat.mean()).double().mean())
    with pytest.raises(ValueError, match="no entry"):
        outlier_ratios(blocks, activation_norms={})


def test_outlier_ratios_score_base_weights_not_adapters_and_feed_weighted_layers():
    base = tiny_llama(4)
    peft_model = tiny_peft_llama(num_layers=4)  # same seed: same base weights, plus non-zero LoRA weights
    ratios = outlier_ratios(peft_model, threshold=3.0)
    assert torch.equal(ratios, outlier_ratios(base, threshold=3.0)) and bool((ratios > 0).all())
    opt = ISTAdamW(peft_model, lr=1e-2, policy=WeightedLayers(ratios, active_layers=1))
    assert len(opt.active_layers) == 1


# ---------------------------------------------------------------------- outside_layers
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@pytest.mark.parametrize("outside_layers", ["train", "freeze"])
def test_outside_layers_train_every_step_or_never(outside_layers):
    model = tiny_llama(4).double()  # full-layer mode: no adapters
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0, outside_layers=outside_layers)
    params = dict(model.named_parameters())
    outside = [params[n] for n in OUTSIDE if n in params]
    assert outside and all(p.requires_grad == (outside_layers == "train") for p in outside)
    for step in range(3):
        before = [p.detach().clone() for p in outside]
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        changed = [not torch.equal(p, b) for p, b in zip(outside, before)]
        assert all(changed) if outside_layers == "train" else not any(changed)
    has_state = [p in opt.optimizer.state for p in outside]
    assert all(has_state) if outside_layers == "train" else not any(has_state)
    # trained embeddings need backward below the lowest selected block; frozen ones nothing below it
    assert (opt.memory_report()["backward_cuts_skipped"] > 0) == (outside_layers == "train")
    assert opt.state_dict()["ist"]["options"]["outside_layers"] == outside_layers
    opt.remove_hooks()
    assert all(p.requires_grad for p in model.parameters())


def test_outside_layers_is_validated():
    with pytest.raises(ValueError, match="outside_layers"):
        ISTAdamW(tiny_llama(4), lr=1e-2, num_probes=0, outside_layers="never")


# ---------------------------------------------------------------------- the policy x adapter-kind matrix
def _model_of_kind(kind: str) -> nn.Module:
    from ist_optim import add_adapters

    if kind == "dora":
        return tiny_peft_llama(num_layers=4, dora=True, dtype=torch.float64)
    model = tiny_llama(4).double()
    if kind == "series":
        add_adapters(model, ["down_proj"], "series", bottleneck=4)
    elif kind == "parallel":
        add_adapters(model, ["up_proj", "down_proj"], "parallel", bottleneck=4)
    return model  # "full-layer": no adapters, every block parameter trains


@pytest.mark.parametrize("kind", ["dora", "series", "parallel", "full-layer"])
@pytest.mark.parametrize(
    "policy", ["random", "lisa", "spread", "safe", "cka", "layerwise-cka", "gradnorm", "weighted", "fixed"]
)
def test_every_policy_trains_only_its_layers_with_every_adapter_kind(policy, kind):
    from ist_optim import FixedLayers

    model = _model_of_kind(kind)
    make = {
        "cka": lambda: CKALayers(1, warmup_steps=2, num_batches=1),
        "gradnorm": lambda: GradNormLayers(1, interval=2, seed=0),
        "weighted": lambda: WeightedLayers([1.0, 0.0, 2.0, 3.0], 1, seed=0),
        "fixed": lambda: FixedLayers([2]),
        "lisa": lambda: LISALayers(1, interval_steps=2, seed=0),
        "safe": lambda: SafeImportance(1, seed=0),
        "layerwise-cka": lambda: LayerwiseCKA([lm_batch(seed=99)], active_layers=1),
    }
    options = dict(outside_layers="freeze") if kind == "full-layer" else {}
    opt = ISTAdamW(
        model,
        lr=1e-2,
        policy=make[policy]() if policy in make else policy,
        active_layers=1,
        num_probes=0,
        state_policy="drop",
        **options,
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad} | {
        n for n, p in model.named_parameters() if any(p is q for ps in opt.layer_map.params for q in ps)
    }
    for step in range(5):
        selected = opt.active_layers
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved <= trained and {layer_of(n) for n in moved} == set(selected), (step, selected)
    if policy == "cka":
        assert opt.scheduler.ranked and len(opt.active_layers) == 1
        assert bool(torch.isfinite(opt.scheduler.cka).all())
    if policy == "gradnorm":
        assert opt.scheduler.num_scored == 3 and bool((opt.scheduler.scores > 0).all())
