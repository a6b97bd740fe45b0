"""Smoke runs of the main job and the quality benchmark on config-built models, so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def table_rows(output: str, arms: list[str]) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] in arms and len(fields) == 8:
            rows[fields[0]] = fields[1:]
    return rows


def test_main_job_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    out = run(
        "train.py",
        "--model",
        "tiny",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--probe-interval",
        "2",
        "--eval-size",
        "32",
        "--out",
        str(tmp_path),
    )
    rows = table_rows(out, ["lora", "ist", "random"])
    assert set(rows) == {"lora", "ist", "random"}
    assert len({r[1] for r in rows.values()}) == 1  # one zero-shot accuracy: every arm starts from the same model
    assert float(rows["ist"][0]) == 4 * float(rows["lora"][0])  # sparse arms: lr / active_layers by default
    assert "ist: importance after 3 updates" in out and "random: importance" not in out
    assert "ist: importance report: rho" in out  # the diagnostic, once after training (the other arm: its sentence)
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "importance_ist.png").stat().st_size > 0


@pytest.mark.skipif(not (DATA / "llmadapters" / "ARC-Easy").exists(), reason="../shared/data is not beside the project")
@pytest.mark.parametrize("data", ["llmadapters/ARC-Easy", "sst2"])
def test_main_job_reads_a_real_dataset(tmp_path, data):
    pytest.importorskip("matplotlib")
    out = run(
        "train.py",
        "--model",
        "tiny",
        "--data",
        str(DATA / data),
        "--arms",
        "lora,ist",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--probe-interval",
        "1",
        "--eval-size",
        "8",
        "--out",
        str(tmp_path),
    )
    assert set(table_rows(out, ["lora", "ist"])) == {"lora", "ist"}


def test_quality_benchmark_smoke_resumes_and_summarizes(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "quality.jsonl"
    args = [
        "--model",
        "tiny",
        "--setting",
        "weekday",
        "--arms",
        "lora,ist,ist-paper,random",
        "--policy",
        "gradnorm",
        "--seeds",
        "0,1",
        "--budgets",
        "2,4",
        "--sparse-lr-scales",
        "1,4",
        "--probe-interval",
        "2",
        "--eval-size",
        "16",
        "--out",
        str(results),
    ]
    out = run("quality.py", *args)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    # lora once per seed, each sparse arm (the --policy one too) once per seed and lr scale
    assert len(records) == 2 * (1 + 4 * 2)
    assert {(r["arm"], r["sparse_lr_scale"]) for r in records} >= {
        ("lora", 1.0),
        ("ist", 4.0),
        ("random", 1.0),
        ("policy:gradnorm", 4.0),
    }
    ist = next(r for r in records if r["arm"] == "ist")
    assert set(ist["val"]) == {"2", "4"} and len(ist["importance"]) == 2 and sum(ist["layer_counts"]) == 4 * 1
    assert all(("layer_choice" in r) == (r["arm"] != "lora") for r in records)  # the diagnostic per sparse run
    assert isinstance(ist["layer_choice"]["sentence"], str) and "rho" in ist["layer_choice"]
    assert "first budget from which" in out and "agreement across seeds" in out
    assert "guessing 14.3% val / 14.3% test" in out  # 7 day names
    assert (tmp_path / "quality_weekday_tiny.png").stat().st_size > 0  # plots of models other than smollm2 are named
    run("quality.py", *args)  # resumed: every run is already there
    assert len(results.read_text().splitlines()) == len(records)


def _bench_module(name: str):
    """Import a bench/ script as a module (its own imports resolve in bench/)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_quality_benchmark_runs_the_seed_and_safe_policies(tmp_path):
    """LISA, SafeImportance and layer-wise CKA (ranked on calibration batches of the task) as quality arms."""
    results = tmp_path / "quality.jsonl"
    run(
        "quality.py",
        "--model",
        "tiny",
        "--setting",
        "weekday",
        "--arms",
        "lora,ist,policy:lisa,policy:safe,policy:layerwise_cka",
        "--seeds",
        "0",
        "--budgets",
        "3",
        "--sparse-lr-scales",
        "4",
        "--eval-size",
        "16",
        "--probe-rows",
        "2",
        "--probe-interval",
        "1",
        "--out",
        str(results),
    )
    records = {r["arm"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(records) == {"lora", "ist", "policy:lisa", "policy:safe", "policy:layerwise_cka"}
    assert records["ist"]["probe_rows"] == 2 and len(records["ist"]["importance"]) == 3  # a probe round a step
    cka = records["policy:layerwise_cka"]["layer_counts"]
    assert sorted(cka, reverse=True)[: sum(c > 0 for c in cka)] == [3] * sum(c > 0 for c in cka)  # fixed layers


def test_quality_benchmark_defaults_are_each_settings_study():
    """A bare ``--setting X`` runs the study the README reports for X; a flag overrides its part only."""
    quality = _bench_module("quality")
    commonsense = quality.parse_args(["--setting", "commonsense"])
    assert (commonsense.batch, commonsense.max_prompt_tokens, commonsense.eval_size) == (8, 96, 128)
    assert (commonsense.budgets, commonsense.sparse_lr_scales) == ([60], [4.0])
    assert (commonsense.arms, commonsense.seeds) == (["lora", "ist", "random"], [0, 1, 2])
    overridden = quality.parse_args(["--setting", "commonsense", "--batch", "4", "--arms", "ist-paper"])
    assert (overridden.batch, overridden.arms, overridden.eval_size) == (4, ["ist-paper"], 128)
    assert quality.parse_args(["--setting", "sst2", "--model", "minilm"]).budgets == [60, 120, 240, 480]
    assert quality.parse_args(["--setting", "sst2"]).budgets == [30, 60]
    weekday = quality.parse_args(["--setting", "weekday"])
    assert (weekday.budgets, weekday.sparse_lr_scales, weekday.batch) == ([20, 40, 80], [1.0, 4.0], 16)
    tiny = quality.parse_args(["--setting", "commonsense", "--model", "tiny"])  # no study of its own
    assert (tiny.batch, tiny.eval_size, tiny.budgets) == (16, 256, [60, 120, 240])


def test_quality_summary_keeps_runs_with_other_options_apart(tmp_path, capsys):
    """Runs that differ in batch (or active_layers, ...) are rows of their own, each held against LoRA-all's of its batch."""
    pytest.importorskip("matplotlib")
    quality = _bench_module("quality")
    out = tmp_path / "q.jsonl"

    def record(arm: str, seed: int, batch: int, accuracy: float, **extra) -> dict:
        return {
            "setting": "weekday",
            "model": "tiny",
            "arm": arm,
            "seed": seed,
            "lr": 5e-4,
            "steps": 4,
            "batch": batch,
            "sparse_lr_scale": 1.0 if arm == "lora" else 4.0,
            "probe_interval": 2,
            "importance_lr": 10.0,
            "val": {"4": {"accuracy": accuracy, "loss": 1.0}},
            "test": {"accuracy": accuracy},
            "step_seconds": [1.0],
            "probe_step": [False],
            "peak_bytes": 2**20,
            "importance": [],
            "layer_counts": [1, 1],
            **extra,
        }

    records = [record("lora", s, 16, 0.80) for s in (0, 1)] + [record("random", s, 16, 0.795) for s in (0, 1)]
    records += [record("lora", s, 8, 0.60) for s in (0, 1)] + [record("random", s, 8, 0.40) for s in (0, 1)]
    longer = record("ist", 0, 16, 0.9, steps=8)  # another budget: its own row, no cell at budget 4
    longer["val"] = {"8": {"accuracy": 0.9, "loss": 0.5}}
    records.append(longer)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    quality.summarize(quality.parse_args(["--model", "tiny", "--setting", "weekday", "--out", str(out)]))
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    # one row per (arm, steps, batch), not pooled (a pooled LoRA row would read 70.0 +- 11.5)
    assert "lora steps=4,batch=16 2 80.0 +- 0.0 - 80.0 +- 0.0" in "\n".join(lines)
    assert "lora steps=4,batch=8 2 60.0 +- 0.0 - 60.0 +- 0.0" in "\n".join(lines)
    assert "random steps=4,batch=16 lr x4 2 79.5 +- 0.0 - 79.5 +- 0.0" in "\n".join(lines)
    assert "ist steps=8,batch=16 lr x4 1 - 90.0 +- 0.0 90.0 +- 0.0 0.500" in "\n".join(lines)
    # each held against LoRA-all at its own batch: within 1 point at 16, far behind at 8
    assert "random steps=4,batch=16 lr x4 4" in lines and "random steps=4,batch=8 lr x4 none of [4]" in lines
    # active_layers is part of a run's identity: a 0.5 run is not skipped as done by a 0.25 one
    base = record("ist", 0, 16, 0.5)
    assert quality.run_key(base) == quality.run_key({**base, "active_layers": 0.25})
    assert quality.run_key(base) != quality.run_key({**base, "active_layers": 0.5})


@pytest.mark.parametrize("model", ["tiny", "gpt2"])
def test_step_split_smoke(model):
    out = run(
        "step_split.py", "--model", model, "--seq", "16", "--rounds", "4", "--warmup", "1", "--probe-interval", "2"
    )
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["lora"], ["ist"])}
    assert set(rows) == {"lora", "ist"}
    assert float(rows["ist"][3]) > 0 and float(rows["lora"][3]) == 0  # only IST has probe rounds
    assert float(rows["lora"][-1]) == 1.0


def test_step_split_times_probe_rows_arms_and_random():
    out = run(
        "step_split.py",
        "--model",
        "tiny",
        "--seq",
        "16",
        "--rounds",
        "4",
        "--warmup",
        "1",
        "--probe-interval",
        "2",
        "--probe-rows",
        "1.0",
        "2",
        "--random",
    )
    rows = {}
    for line in out.splitlines():  # the table's rows, not the summary lines after it
        if line.split()[:1] in (["lora"], ["ist"], ["ist@2"], ["random"]):
            rows.setdefault(line.split()[0], line.split()[1:])
    assert set(rows) == {"lora", "ist", "ist@2", "random"}
    assert float(rows["ist@2"][3]) > 0 and float(rows["random"][3]) == 0  # random has no probe rounds
    assert "probe_rows=[1.0, 2]" in out and "ist@2 with amortised probes / random: " in out


def test_quality_benchmark_keeps_estimator_options_apart(tmp_path):
    """A run with reward="standardized" / probe_layers=1 is a run of its own, resumed and tabled as its own group."""
    pytest.importorskip("matplotlib")
    results = tmp_path / "quality.jsonl"
    common = [
        "--model",
        "tiny",
        "--setting",
        "weekday",
        "--arms",
        "ist",
        "--seeds",
        "0",
        "--budgets",
        "2",
        "--sparse-lr-scales",
        "4",
        "--probe-interval",
        "1",
        "--eval-size",
        "8",
        "--out",
        str(results),
    ]
    # same importance_lr as the default run: only the estimator options tell the two runs apart
    standardized = [*common, "--reward", "standardized", "--probe-layers", "1"]
    run("quality.py", *common)
    out = run("quality.py", *standardized)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["reward"], r["probe_layers"], r["importance_lr"]) for r in records] == [
        ("difference", 0.5, 10.0),
        ("standardized", 1, 10.0),
    ]
    assert records[0]["importance"] != records[1]["importance"]  # the option reached the optimizer
    assert "ist probe_layers=1,reward=standardized,mu=10 lr x4" in out and "\nist lr x4" in out
    run("quality.py", *standardized)  # resumed: nothing re-run
    assert len(results.read_text().splitlines()) == 2


def test_importance_study_smoke(tmp_path):
    out_json = tmp_path / "study.json"
    out = run(
        "importance_study.py",
        "--model",
        "tiny",
        "--train-steps",
        "6",
        "--batches",
        "3",
        "--masks",
        "2",
        "--replays",
        "3",
        "--out",
        str(out_json),
        "--probe-rows",
        "4",
    )
    data = json.loads(out_json.read_text())
    assert len(data["rows"]) == 3 and len(data["rows"][0]["single"]) == data["layers"] == 4
    assert len(data["importance"]) == 1  # one probe round at probe_interval=5 in 6 steps
    for estimator in ("reference", "zscore", "antithetic", "lstsq", "single"):
        assert f"{estimator}@16" in out
    assert "reference/rows=4@16" in out and "zscore/rows=4@64" in out
    row = data["rows"][0]  # per-row losses of each half-mask: their mean is the probe's loss
    assert len(row["mask_row_losses"]) == len(row["mask_losses"]) == 4 and len(row["mask_row_losses"][0]) == 16
    for loss, per_row in zip(row["mask_losses"], row["mask_row_losses"]):
        assert abs(sum(per_row) / len(per_row) - loss) < 1e-5


def test_quality_benchmark_classifier_smoke(tmp_path):
    """--model tiny-bert: an encoder with a classification head (the MiniLM setting's code path), every arm."""
    pytest.importorskip("matplotlib")
    results = tmp_path / "quality.jsonl"
    args = [
        "--model",
        "tiny-bert",
        "--setting",
        "weekday",
        "--arms",
        "lora,ist,random",
        "--seeds",
        "0",
        "--budgets",
        "2,4",
        "--sparse-lr-scales",
        "4",
        "--probe-interval",
        "2",
        "--eval-size",
        "16",
        "--out",
        str(results),
    ]
    out = run("quality.py", *args)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["model"], r["arm"]) for r in records] == [
        ("tiny-bert", "lora"),
        ("tiny-bert", "ist"),
        ("tiny-bert", "random"),
    ]
    ist = next(r for r in records if r["arm"] == "ist")
    assert len(ist["importance"]) == 2 and len(ist["layer_counts"]) == 4  # the 4 encoder blocks are the layers
    assert "ist lr x4" in out and (tmp_path / "quality_weekday_tiny-bert.png").stat().st_size > 0


def test_gpu_check_smoke_runs_every_check_without_cuda(tmp_path):
    """The GPU check's CPU run (interpreter kernels, tiny sizes): every check runs and passes, JSON and table written."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU run the real thing: python bench/gpu_check.py")
    output = run("gpu_check.py", "--quick", "--out", str(tmp_path))
    assert "No CUDA device" in output
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    sections = {row["section"] for row in result["checks"]}
    assert sections == {"kernels", "autocast", "probes", "offload", "fuse_lora"}
    assert [row for row in result["checks"] if row["status"] != "pass"] == []
    assert len(result["checks"]) == 13
    table = (tmp_path / "gpu_check_cpu.md").read_text()
    assert "13 passed, 0 failed" in table and table.count("| pass |") == 13
