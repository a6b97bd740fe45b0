"""Layer discovery on several architectures (no class map) and its overrides."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ist_optim import ISTAdamW, discover_layers


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def gpt2(layers=3, attn_implementation="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=layers, n_head=4, attn_implementation=attn_implementation
    )
    return get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))


def bert(layers=3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return get_peft_model(
        BertForSequenceClassification(config),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )


def test_gpt2_blocks_are_transformer_h():
    model = gpt2()
    layer_map = discover_layers(model, trainable(model))
    assert [n.split("model.")[-1] for n in layer_map.names] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert all(len(group) == 8 for group in layer_map.params)  # A and B of c_attn, attn c_proj, c_fc, mlp c_proj
    assert layer_map.other_params == []


def test_bert_blocks_are_encoder_layer_and_the_classifier_head_is_outside():
    model = bert()
    layer_map = discover_layers(model, trainable(model))
    assert [n.split("model.")[-1] for n in layer_map.names] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert layer_map.other_params  # the classifier trains every step
    assert all(
        "classifier" in name for name, p in model.named_parameters() if any(p is q for q in layer_map.other_params)
    )


@pytest.mark.parametrize("make", [gpt2, bert])
def test_ist_trains_gpt2_and_bert(make):
    model = make()
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, probe_layers=1, num_probes=2, probe_interval=1)
    ids = torch.randint(0, 64, (2, 8))
    labels = ids if "GPT2" in type(model.get_base_model()).__name__ else torch.tensor([0, 1])
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.scheduler.num_updates == 3


def test_layers_with_no_adapters_are_not_layers():
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(6), LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[2, 3, 5]))
    layer_map = discover_layers(model, trainable(model))
    assert [n.rsplit(".", 1)[-1] for n in layer_map.names] == ["2", "3", "5"]


def test_nested_module_lists_use_the_outermost():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList(Expert() for _ in range(3))

    model = Model()
    layer_map = discover_layers(model, list(model.parameters()))
    assert layer_map.names == ["stack.0", "stack.1", "stack.2"]
    assert [len(g) for g in layer_map.params] == [4, 4, 4]


def test_encoder_and_decoder_stacks_are_concatenated():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.decoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    model = Model()
    assert discover_layers(model, list(model.parameters())).names == [
        "encoder.0",
        "encoder.1",
        "decoder.0",
        "decoder.1",
        "decoder.2",
    ]


def test_layers_override():
    model = gpt2(4)
    blocks = model.get_base_model().transformer.h
    layer_map = discover_layers(model, trainable(model), layers=[blocks[3], blocks[1]])
    assert [n.rsplit(".", 1)[-1] for n in layer_map.names] == ["3", "1"]
    # params in blocks not listed train every step
    assert len(layer_map.other_params) == 16


def test_layer_of_override_groups_by_returned_index():
    model = gpt2(4)

    def pairs(name: str) -> int | None:  # two blocks per "layer"
        return int(name.split(".h.")[1].split(".")[0]) // 2 if ".h." in name else None

    layer_map = discover_layers(model, trainable(model), layer_of=pairs)
    assert layer_map.names == ["layer_of:0", "layer_of:1"]
    assert [len(g) for g in layer_map.params] == [16, 16]
    opt = ISTAdamW(model, lr=1e-3, layer_of=pairs, active_layers=1, num_probes=0)
    assert len(opt.layer_names) == 2


def test_bad_overrides_raise():
    model = gpt2()
    with pytest.raises(ValueError, match="at most one"):
        discover_layers(model, trainable(model), layers=[model], layer_of=lambda n: 0)
    with pytest.raises(TypeError, match="ModuleList"):
        discover_layers(model, trainable(model), layers=model.get_base_model().transformer)
    with pytest.raises(TypeError, match="nn.Module"):
        discover_layers(model, trainable(model), layers=["h.0"])
    with pytest.raises(ValueError, match="layer_of"):
        discover_layers(model, trainable(model), layer_of=lambda n: -1)
    with pytest.raises(TypeError, match="callable"):
        discover_layers(model, trainable(model), layer_of={"a": 0})
    with pytest.raises(ValueError, match="searched the 1 modules passed"):
        discover_layers(model, trainable(model), layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="share parameters"):
        blocks = model.get_base_model().transformer.h
        discover_layers(model, trainable(model), layers=[blocks[0], blocks[0]])
