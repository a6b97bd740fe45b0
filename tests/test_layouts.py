"""IST's gradients equal a plain backward with the same layers frozen by hand, in many model layouts.

The reference is a copy of the model without IST, its unselected layers frozen
by hand, run forward and backward as usual. Everything in float64 and compared
with a tight tolerance (the backward cut and the recomputes change no
arithmetic, but a bitwise comparison across checkpointing's recompute is not
portable across CPUs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, lm_batch, tiny_llama
from torch import nn

from ist_optim import ISTAdamW

WIDTH = 8


class Block(nn.Module):
    """A residual block with a trainable linear: ``x + tanh(W x)``."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.linear(hidden))


class CustomNet(nn.Module):
    """A frozen embedding whose output requires grad (as ``enable_input_require_grads``), blocks, a frozen head.

    ``get_input_embeddings()`` names the embedding, as HF models do: only its output may be cut away from.

    ``order``: the order the blocks are called in (repeats allowed: weight sharing).
    ``prompt``: a learned prompt added before the blocks. ``projector``: two stacks with a trained projector between.
    """

    def __init__(self, depth: int = 4, order: list[int] | None = None, prompt: bool = False, projector: bool = False):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH).requires_grad_(False)
        self.prompt = nn.Parameter(torch.randn(WIDTH)) if prompt else None
        if projector:
            self.vision = nn.ModuleList(Block() for _ in range(depth // 2))
            self.projector = nn.Linear(WIDTH, WIDTH)
            self.layers = nn.ModuleList(Block() for _ in range(depth // 2))
        else:
            self.layers = nn.ModuleList(Block() for _ in range(depth))
        self.order = order if order is not None else list(range(len(self.layers)))
        self.head = nn.Linear(WIDTH, 1).requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:  # HF's convention: its output may be a leaf nobody reads
        return self.embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x).requires_grad_()
        if self.prompt is not None:
            hidden = hidden + self.prompt
        if hasattr(self, "projector"):
            for block in self.vision:
                hidden = block(hidden)
            hidden = self.projector(hidden)
        for index in self.order:
            hidden = self.layers[index](hidden)
        return self.head(hidden).pow(2).mean()


class Head(nn.Module):
    def __init__(self, width: int, size: int):
        super().__init__()
        self.query = nn.Linear(width, size, bias=False)
        self.key = nn.Linear(width, size, bias=False)
        self.value = nn.Linear(width, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), dim=-1)
        return weights @ self.value(x)


class TutorialBlock(nn.Module):
    """The block of a well-known minimal GPT tutorial: attention heads in an inner ``ModuleList``."""

    def __init__(self, width: int = WIDTH, heads: int = 2):
        super().__init__()
        self.heads = nn.ModuleList(Head(width, width // heads) for _ in range(heads))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.cat([head(x) for head in self.heads], dim=-1)
        return x + self.mlp(x)


class TutorialGPT(nn.Module):
    """Blocks in an ``nn.Sequential``, a ``ModuleList`` of task heads registered before them."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.task_heads = nn.ModuleList(nn.Linear(WIDTH, 1) for _ in range(2))
        self.embed = nn.Embedding(VOCAB, WIDTH).requires_grad_(False)
        self.blocks = nn.Sequential(*[TutorialBlock() for _ in range(depth)])

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks(self.embed(ids).requires_grad_())
        return sum(head(hidden).pow(2).mean() for head in self.task_heads)


# ---------------------------------------------------------------------------- layouts
def _peft(model: nn.Module, **config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    return model


def decoder():
    model = _peft(tiny_llama(4), target_modules=["q_proj", "v_proj", "down_proj"])
    return model, lambda: ((), lm_batch())


def embedding_lora():
    model = _peft(tiny_llama(4), target_modules=["q_proj", "v_proj", "embed_tokens"])
    return model, lambda: ((), lm_batch())


def encoder_decoder():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
    )
    model = _peft(T5ForConditionalGeneration(config), target_modules=["q", "v"])
    batch = lm_batch()
    return model, lambda: ((), {"input_ids": batch["input_ids"], "labels": batch["labels"]})


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = _peft(
        ViTForImageClassification(config), target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 8, 8, generator=g)
    return model, lambda: ((), {"pixel_values": pixels, "labels": torch.tensor([0, 2])})


def _custom(**kwargs):
    def build():
        torch.manual_seed(0)
        model = CustomNet(**kwargs)
        x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0))
        return model, lambda: ((x,), {})

    return build


def tutorial_gpt():
    torch.manual_seed(0)
    model = TutorialGPT()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    return model, lambda: ((ids,), {})


LAYOUTS = {
    "decoder": decoder,
    "embedding_lora": embedding_lora,
    "encoder_decoder": encoder_decoder,
    "vit": vit,
    "custom": _custom(),
    "weight_sharing": _custom(depth=2, order=[0, 1, 0, 1, 0]),
    "reversed_order": _custom(order=[3, 2, 1, 0]),
    "learned_prompt": _custom(prompt=True),
    "two_stacks_projector": _custom(projector=True),
    "sequential_blocks": tutorial_gpt,
}
HF_LAYOUTS = {"decoder", "embedding_lora", "encoder_decoder", "vit"}
# layouts in which something upstream of every block needs a gradient: the cut must never apply
NEVER_CUT = {"embedding_lora", "learned_prompt"}
SELECTIONS = ([3], [0], [1, 3], [2], [0, 3])

CASES = [
    (layout, checkpointing, selective)
    for layout in LAYOUTS
    for checkpointing in (["none", "reentrant", "non_reentrant"] if layout in HF_LAYOUTS else ["none"])
    for selective in (False, True)
]


def _double(inputs):
    args, kwargs = inputs
    cast = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _loss(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.loss


@pytest.mark.parametrize("layout,checkpointing,selective", CASES)
def test_gradients_equal_a_plain_backward_with_the_same_layers_frozen_by_hand(layout, checkpointing, selective):
    model, make_inputs = LAYOUTS[layout]()
    model = model.double()
    if checkpointing != "none":
        base = model.get_base_model()
        base.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        base.enable_input_require_grads()  # as peft users do: reentrant checkpointing needs it
    model.train()
    reference = copy.deepcopy(model)  # no IST: frozen by hand below
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0, checkpoint_unselected=selective)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(reference.named_parameters())
    trainable_at_start = {n for n, p in reference.named_parameters() if p.requires_grad}
    num_layers = len(opt.layer_names)
    compared = 0
    for selection in SELECTIONS:
        selection = [i % num_layers for i in selection]
        opt._set_selection(sorted(set(selection)))
        frozen = {names[id(p)] for i, params in enumerate(opt.layer_map.params) if i not in selection for p in params}
        for name, p in ref_params.items():
            p.requires_grad_(name in trainable_at_start and name not in frozen)
        args, kwargs = _double(make_inputs())
        _loss(model(*args, **kwargs)).backward()
        _loss(reference(*args, **kwargs)).backward()
        for name, p in model.named_parameters():
            q = ref_params[name]
            assert (p.grad is None) == (q.grad is None), (name, selection)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=f"{name} {selection}")
                compared += 1
        for i in selection:  # not vacuous: every selected layer trained
            assert all(p.grad is not None for p in opt.layer_map.params[i]), (opt.layer_names[i], selection)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    assert compared > 0
    report = opt.memory_report()
    if layout in NEVER_CUT:
        assert report["backward_cuts"] == 0 and report["backward_cuts_skipped"] > 0
    elif layout != "two_stacks_projector" and (layout not in HF_LAYOUTS or checkpointing != "none"):
        # the blocks' input requires grad here, so the cut has something to do
        assert report["backward_cuts"] > 0


def test_discovery_picks_the_sequential_block_stack_not_heads():
    opt = ISTAdamW(TutorialGPT(), lr=1e-3, num_probes=0)
    assert opt.layer_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert any(p is opt.layer_map.other_params[0] for p in opt.model.task_heads[0].parameters())


def test_discovery_finds_both_stacks_and_layers_accepts_a_sequential():
    model = CustomNet(projector=True)
    opt = ISTAdamW(model, lr=1e-3, num_probes=0)
    assert opt.layer_names == ["vision.0", "vision.1", "layers.0", "layers.1"]
    opt.remove_hooks()
    gpt = TutorialGPT()
    opt = ISTAdamW(gpt, lr=1e-3, num_probes=0, layers=gpt.blocks)
    assert opt.layer_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


def test_a_repeated_block_is_cut_at_its_first_call_only():
    model = CustomNet(depth=2, order=[0, 1, 0, 1])
    opt = ISTAdamW(model, lr=1e-3, active_layers=1, num_probes=0)
    opt._set_selection([1])
    calls = []
    model.layers[1].register_forward_pre_hook(lambda m, args: calls.append(args[0].grad_fn is None))
    model(torch.randn(2, WIDTH)).backward()
    # first call of layer 1: its input was cut (a detached leaf); second call: the graph is intact
    assert calls == [True, False]
    assert opt.hooks.cut_count == 1
    assert model.layers[0].linear.weight.grad is None and model.layers[1].linear.weight.grad is not None


def test_a_prompt_trained_outside_the_model_keeps_its_gradient():
    """A soft prompt held by the caller (its own optimizer), concatenated into ``inputs_embeds``."""
    model = _peft(tiny_llama(4), target_modules=["q_proj", "v_proj"]).double()
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-3, active_layers=1, num_probes=0)
    opt._set_selection([2])
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(reference.named_parameters())
    for i, params in enumerate(opt.layer_map.params):
        for p in params:
            ref_params[names[id(p)]].requires_grad_(i == 2)
    prompt = nn.Parameter(torch.randn(1, 3, 32, dtype=torch.float64))
    ref_prompt = nn.Parameter(prompt.detach().clone())
    ids = lm_batch()["input_ids"]
    labels = torch.cat([torch.full((2, 3), -100), ids], 1)
    for m, p in ((model, prompt), (reference, ref_prompt)):
        embeds = torch.cat([p.expand(2, -1, -1), m.get_input_embeddings()(ids)], 1)
        m(inputs_embeds=embeds, labels=labels).loss.backward()
    torch.testing.assert_close(prompt.grad, ref_prompt.grad, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        assert (p.grad is None) == (ref_params[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-10, atol=1e-12)
    assert opt.memory_report()["backward_cuts_skipped"] == 1


def test_a_perturbation_added_by_a_hook_keeps_its_gradient():
    """FreeLB/PGD-style: a tensor that requires grad, added to the embeddings by a forward hook."""
    model = _peft(tiny_llama(4), target_modules=["q_proj", "v_proj"]).double()
    model.get_base_model().enable_input_require_grads()
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-3, active_layers=1, num_probes=0)
    opt._set_selection([1])
    for p, q in zip(model.parameters(), reference.parameters()):
        q.requires_grad_(p.requires_grad)
    batch = lm_batch()
    grads = []
    for m in (model, reference):
        delta = torch.zeros(2, 8, 32, dtype=torch.float64, requires_grad=True)
        handle = m.get_input_embeddings().register_forward_hook(lambda mod, args, out: out + delta)
        m(**batch).loss.backward()
        handle.remove()
        grads.append(delta.grad)
    assert grads[0] is not None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    assert opt.memory_report()["backward_cuts_skipped"] == 1
    # without the perturbation, the input embeddings' own leaf is cut away from as before
    model(**batch).loss.backward()
    assert opt.memory_report()["backward_cuts"] == 1


class RebindingNet(nn.Module):
    """The embedding's output dies mid-forward (``h = emb(ids) * 2``) and a perturbation leaf is made after it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH).requires_grad_(False)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.deltas: list[torch.Tensor] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * 2.0
        delta = torch.zeros_like(hidden, requires_grad=True)  # may reuse the dead output's id
        self.deltas.append(delta)
        hidden = hidden + delta
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden.pow(2).mean()


def test_a_leaf_made_after_the_embedding_output_died_keeps_its_gradient():
    torch.manual_seed(0)
    model = RebindingNet()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0)
    opt._set_selection([0])
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(20):  # the id reuse is up to the allocator: try many times
        model.deltas.clear()
        model(ids).backward()
        assert model.deltas[0].grad is not None
    assert opt.hooks.cut_count == 0
