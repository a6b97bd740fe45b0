"""Smoke runs of the peers benchmark (bench/peers.py) on a config-built model, so the harness cannot rot.

Peers that are not installed are skipped by the harness with a message; the
``.[peers]`` extra installs them (CI does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
METHODS = ["lora", "ist", "ist-x4", "ist-x4-ckpt", "random-x4", "badam-lora", "badam", "galore", "apollo", "full"]
PEER_MODULES = {"badam-lora": "badam", "badam": "badam", "galore": "galore_torch", "apollo": "apollo_torch"}


def run(*args: str, env: dict[str, str] | None = None, script: str = "peers.py") -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def installed(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - galore_torch fails inside bitsandbytes when that is broken
        return False
    return True


def records(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_every_method_runs_resumes_and_summarizes(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "peers.jsonl"
    args = ["--model", "tiny", "--steps", "3", "--seeds", "0", "--eval-size", "16", "--out", str(out)]
    printed = run(*args)
    defaults = [m for m in METHODS if m != "ist-x4-ckpt"]  # same numbers as ist-x4: memory-only runs take it
    expected = [m for m in defaults if installed(PEER_MODULES.get(m, "torch"))]
    for method in defaults:
        if method not in expected:
            assert f"{method:10s} skipped: " in printed  # a missing peer is reported, not dropped silently
    runs = records(out)
    assert sorted(runs) == sorted(expected)
    for method, r in runs.items():
        assert len(r["train_loss"]) == 3 and len(r["step_seconds"]) == 1, method  # 2 measured steps, 1 timed
        assert 0.0 <= r["test"]["accuracy"] <= 1.0 and r["peak_bytes"] > 0, method
    assert runs["lora"]["peak_bytes"] < runs["full"]["peak_bytes"]
    assert runs["ist"]["version"] == "ist-optim" and runs["full"]["version"].startswith("torch ")

    again = run(*args)  # resumable: every run is in the file, nothing is redone
    assert "seed 0:" not in again and len(out.read_text().splitlines()) == len(expected)

    plot = tmp_path / "frontier.png"
    table = run(*args, "--summary", "--plot", str(plot))
    rows = {line.split()[0] for line in table.splitlines() if line.split() and line.split()[0] in METHODS}
    assert rows == set(expected) and plot.stat().st_size > 0


def test_peak_memory_counts_the_optimizer_state(tmp_path):
    """The memory window opens before the optimizer is built, so state built at the first step is counted.

    With one example per batch the activations are small next to the weights,
    so full fine-tuning's peak must hold the weights, their gradients and
    AdamW's two moments (4x the weights); a window opened after the first step
    would see only the weights, the gradients and the activations.
    """
    out = tmp_path / "peers.jsonl"
    run(
        "--model",
        "tiny",
        "--steps",
        "3",
        "--batch",
        "1",
        "--seeds",
        "0",
        "--eval-size",
        "8",
        "--methods",
        "lora,full",
        "--out",
        str(out),
    )
    runs = records(out)
    full = runs["full"]
    assert full["trainable_bytes"] > 0.99 * full["weight_bytes"]
    assert full["peak_bytes"] >= full["weight_bytes"] + 3 * full["trainable_bytes"]
    assert runs["lora"]["peak_bytes"] < full["weight_bytes"] + full["trainable_bytes"]


def test_a_missing_peer_is_skipped_with_the_reason(tmp_path):
    # A module named badam that fails to import stands for a peer that is not installed.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "badam.py").write_text("raise ImportError('No module named badam (stand-in)')\n")
    out = tmp_path / "peers.jsonl"
    printed = run(
        "--model",
        "tiny",
        "--steps",
        "3",
        "--seeds",
        "0",
        "--eval-size",
        "8",
        "--methods",
        "badam,lora",
        "--out",
        str(out),
        env={"PYTHONPATH": str(fake)},
    )
    assert "badam      skipped: badam is not usable here (ImportError: No module named badam (stand-in))" in printed
    assert list(records(out)) == ["lora"]


def test_lora_sees_the_quality_benchmarks_batches(tmp_path):
    """The peers' LoRA run and bench/quality.py's LoRA arm of the same seed are the same run: same init, same batches."""
    pytest.importorskip("matplotlib")
    peers = tmp_path / "peers.jsonl"
    run(
        "--model", "tiny", "--steps", "4", "--seeds", "1", "--eval-size", "16", "--methods", "lora", "--out", str(peers)
    )
    quality = tmp_path / "quality.jsonl"
    run(
        "--model",
        "tiny",
        "--setting",
        "weekday",
        "--arms",
        "lora",
        "--seeds",
        "1",
        "--budgets",
        "4",
        "--eval-size",
        "16",
        "--out",
        str(quality),
        script="quality.py",
    )
    ours = records(peers)["lora"]["train_loss"]
    theirs = json.loads(quality.read_text().splitlines()[0])["train_loss"]
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)


@pytest.mark.skipif(not (DATA / "llmadapters" / "ARC-Easy").exists(), reason="../shared/data is not beside the project")
def test_long_rows_memory_only(tmp_path):
    out = tmp_path / "peers.jsonl"
    run(
        "--model",
        "tiny",
        "--seq-len",
        "64",
        "--batch",
        "2",
        "--steps",
        "3",
        "--memory-only",
        "--seeds",
        "0",
        "--methods",
        "lora,ist-x4,ist-x4-ckpt,full",
        "--out",
        str(out),
    )
    runs = records(out)
    assert set(runs) == {"lora", "ist-x4", "ist-x4-ckpt", "full"}
    # checkpointing recomputes exactly: the same losses as without it, step for step
    assert runs["ist-x4-ckpt"]["train_loss"] == pytest.approx(runs["ist-x4"]["train_loss"], rel=1e-6)
    assert all(r["setting"] == "commonsense-64" and "test" not in r for r in runs.values())
    table = run(
        "--model",
        "tiny",
        "--seq-len",
        "64",
        "--batch",
        "2",
        "--steps",
        "3",
        "--memory-only",
        "--summary",
        "--out",
        str(out),
    )
    assert "commonsense-64" in table
