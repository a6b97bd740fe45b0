"""Smoke runs of examples/: each script on its tiny config-built model, in a subprocess, two at a time.

The README's and docs' snippets are excerpts of these scripts (between ``--8<--`` markers), so a snippet
that stops working fails here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    results, pending = {}, list(SCRIPTS)
    while pending:  # two at a time: the imports dominate, and CI has two cores
        batch, pending = pending[:2], pending[2:]
        procs = {
            s: subprocess.Popen(
                [sys.executable, s], cwd=EXAMPLES, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for s in batch
        }
        for s, p in procs.items():
            out, _ = p.communicate(timeout=180)
            results[s] = (p.returncode, out)
    return results


def test_every_example_is_listed():
    assert {
        "plain_loop.py",
        "hf_trainer.py",
        "trl_sft.py",
        "accelerate_loop.py",
        "any_optimizer.py",
        "full_layer.py",
        "nanogpt_no_peft.py",
        "ddp_torchrun.py",
    } <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(runs, script):
    rc, out = runs[script]
    assert rc == 0, out[-3000:]
    assert "loss" in out or "skipped" in out or "optimizer:" in out, out[-3000:]


def _python_blocks_after_example_names(text):
    """``(script, block)`` for every python block whose preceding paragraph names ``examples/<script>``."""
    import re

    for m in re.finditer(r"((?:.+\n){1,6})\n?```python\n([\s\S]*?)```", text):
        names = re.findall(r"examples/(\w+\.py)", m.group(1))
        if names:
            yield names[-1], m.group(2)


@pytest.mark.parametrize("doc", ["README.md"])
def test_snippets_are_excerpts_of_the_examples(doc):
    import textwrap

    text = (EXAMPLES.parent / doc).read_text()
    found = list(_python_blocks_after_example_names(text))
    assert len(found) >= 5
    for script, block in found:
        lines = (EXAMPLES / script).read_text().splitlines()
        want = block.rstrip("\n").splitlines()
        windows = ("\n".join(lines[i : i + len(want)]) for i in range(len(lines) - len(want) + 1))
        assert any(textwrap.dedent(w) == "\n".join(want) for w in windows), f"{doc}: snippet not in {script}:\n{block}"
