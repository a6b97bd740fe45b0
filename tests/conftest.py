"""Tiny config-built models shared by the tests (random weights; no network)."""

from __future__ import annotations

import os

import torch

# The Triton kernels run in the interpreter on CPU; it must be on before the
# first @triton.jit is decorated (DESIGN.md section 6).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

VOCAB = 64


def tiny_llama(num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_peft_llama(
    num_layers: int = 4,
    *,
    dora: bool = False,
    rslora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Tiny LLaMA with peft LoRA (or DoRA) on q, k, v, up, down; B made non-zero so adapters matter."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(num_layers, seed, dtype)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        use_dora=dora,
        use_rslora=rslora,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def lm_batch(batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def peft_llama() -> nn.Module:
    return tiny_peft_llama()
