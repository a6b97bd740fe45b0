"""Data-parallel runs on CPU with gloo, 2 processes: every rank trains the same layers with the same importance.

Each test forks 2 workers (a hang fails after a timeout instead of blocking
CI) that train a tiny float64 LLaMA + LoRA on different batches per rank, and
compares what they end with to each other (bit for bit) and to one process
that sees both ranks' batches at once (same global batch: DDP's gradient
average and the mean of the ranks' probe losses are then the mean over the
global batch, up to rounding).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import lm_batch, tiny_peft_llama
from torch.nn.parallel import DistributedDataParallel as DDP

from ist_optim import IST, ISTAdamW

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
STEPS = 12  # 6 probe rounds at probe_interval=2
TIMEOUT_S = 120.0  # per test; a hang (mismatched collectives) fails instead of blocking CI
IST_OPTIONS = dict(active_layers=0.5, probe_interval=2, importance_lr=1000.0, seed=3)


# ---------------------------------------------------------------------- harness
@pytest.fixture(scope="module", autouse=True)
def _imports_before_fork() -> None:
    """Import transformers' and peft's lazy modules once here, not in every forked worker."""
    tiny_peft_llama()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    # What torchrun sets; accelerate and HF Trainer read these to join the group.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    if "accelerate" in sys.modules:  # a single-process state the parent built (another test's Trainer) is not ours
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``fn(rank, *args)`` in 2 forked processes; return what each returned (``torch.save``-able)."""
    out = tmp_path / f"workers-{fn.__name__}-{time.monotonic_ns()}"
    out.mkdir()
    context = mp.start_processes(
        _worker, args=(fn, _free_port(), str(out), args), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                errors = "".join(p.read_text() for p in out.glob("*.err"))
                pytest.fail(f"workers did not finish in {TIMEOUT_S} s (a hang?)\n{errors}")
    except mp.ProcessRaisedException as error:
        pytest.fail(f"a worker raised:\n{error}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def init_gloo(rank: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))


def rank_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    return lm_batch(batch=2, seq=8, seed=1000 * step + rank)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    parts = [rank_batch(step, rank) for rank in range(WORLD)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def summary(model: torch.nn.Module, opt: ISTAdamW, selections: list[list[int]]) -> dict[str, Any]:
    def full(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors

    return {
        "lora": {
            n.removeprefix("module."): full(p.detach()).clone() for n, p in model.named_parameters() if "lora_" in n
        },
        "importance": opt.scheduler.importance.clone(),
        "selections": selections,
        "num_updates": opt.scheduler.num_updates,
        "layer_names": opt.layer_names,
    }


def single_process_reference(steps: int = STEPS, **options: Any) -> dict[str, Any]:
    model = tiny_peft_llama(dtype=torch.float64)
    opt = ISTAdamW(model, lr=1e-2, **{**IST_OPTIONS, **options})
    selections = []
    for step in range(steps):
        selections.append(opt.active_layers)
        model(**global_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return summary(model, opt, selections)


def assert_ranks_agree_and_match_reference(
    results: list[dict[str, Any]], reference: dict[str, Any], steps: int = STEPS
) -> None:
    first, second = results
    # Identical on every rank, bit for bit.
    assert first["selections"] == second["selections"]
    assert torch.equal(first["importance"], second["importance"])
    for name, value in first["lora"].items():
        assert torch.equal(value, second["lora"][name]), name
    # A run that tests something: the selection changed and importance moved.
    assert len({tuple(s) for s in first["selections"]}) > 1
    assert first["num_updates"] == steps // IST_OPTIONS["probe_interval"]
    assert first["importance"].abs().max() > 0.05
    # Equal to one process that sees the global batch (float64; only rounding differs).
    assert first["layer_names"] == reference["layer_names"]
    assert first["selections"] == reference["selections"]
    torch.testing.assert_close(first["importance"], reference["importance"], rtol=0, atol=1e-6)
    assert first["lora"].keys() == reference["lora"].keys()
    for name, value in first["lora"].items():
        torch.testing.assert_close(value, reference["lora"][name], rtol=1e-9, atol=1e-12, msg=name)


# ---------------------------------------------------------------------- DDP
def _ddp_train(rank: int, ist_first: bool) -> dict[str, Any]:
    init_gloo(rank)
    model = tiny_peft_llama(dtype=torch.float64)
    model.enable_input_require_grads()  # as HF gradient checkpointing does: gives the backward cut work
    if ist_first:  # the order of accelerate.prepare and HF Trainer: the optimizer exists before the wrapper
        opt = ISTAdamW(model, lr=1e-2, check_consistency=True, **IST_OPTIONS)
        ddp = DDP(model, find_unused_parameters=True)
    else:
        ddp = DDP(model, find_unused_parameters=True)
        opt = ISTAdamW(ddp, lr=1e-2, check_consistency=True, **IST_OPTIONS)
    selections = []
    for step in range(STEPS):
        selections.append(opt.active_layers)
        ddp(**rank_batch(step, rank)).loss.backward()
        unselected = [p for i, ps in enumerate(opt.layer_map.params) if i not in opt.active_layers for p in ps]
        assert all(p.grad is None for p in unselected)  # DDP leaves globally unused parameters' grads alone
        opt.step()
        opt.zero_grad()
    assert opt.memory_report()["backward_cuts"] > 0
    return summary(model, opt, selections)


@pytest.mark.parametrize("ist_first", [False, True], ids=["ist-on-ddp", "ddp-after-ist"])
def test_ddp_ranks_agree_and_match_one_process(tmp_path, ist_first):
    results = run_workers(_ddp_train, tmp_path, ist_first)
    assert_ranks_agree_and_match_reference(results, single_process_reference())


# ---------------------------------------------------------------------- FSDP2
def _fsdp2_train(rank: int, state_policy: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank)
    model = tiny_peft_llama(dtype=torch.float64)
    model.enable_input_require_grads()
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = ISTAdamW(model, lr=1e-2, check_consistency=True, state_policy=state_policy, **IST_OPTIONS)
    selections = []
    for step in range(STEPS):
        selections.append(opt.active_layers)
        model(**rank_batch(step, rank)).loss.backward()
        unselected = [p for i, ps in enumerate(opt.layer_map.params) if i not in opt.active_layers for p in ps]
        assert all(p.grad is None for p in unselected)
        opt.step()
        opt.zero_grad()
    report = opt.memory_report()
    assert report["backward_cuts"] > 0
    assert (report["optimizer_state_host_bytes"] > 0) == (state_policy == "offload")
    # this rank's shards, not the DTensors' global sizes (world times as much)
    values = [v for entry in opt.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    local = sum(
        v.to_local().numel() * v.element_size() if hasattr(v, "to_local") else v.numel() * v.element_size()
        for v in values
    )
    assert local < sum(v.numel() * v.element_size() for v in values)  # sharded: the two differ
    assert report["optimizer_state_device_bytes"] + report["optimizer_state_host_bytes"] == local
    return summary(model, opt, selections)


@pytest.mark.parametrize("state_policy", ["keep", "offload"])
def test_fsdp2_ranks_agree_and_match_one_process(tmp_path, state_policy):
    results = run_workers(_fsdp2_train, tmp_path, state_policy)
    assert_ranks_agree_and_match_reference(results, single_process_reference())


# ---------------------------------------------------------------------- accelerate and HF Trainer
def _accelerate_train(rank: int, checkpoint: str) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Accelerator joins the gloo group from the environment, as under `accelerate launch`.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    assert accelerator.num_processes == WORLD

    def prepared(seed: int) -> tuple[Any, Any, ISTAdamW]:
        model = tiny_peft_llama(dtype=torch.float64)
        ist = ISTAdamW(model, lr=1e-2, **{**IST_OPTIONS, "seed": seed})
        wrapped, opt = accelerator.prepare(model, ist)
        assert isinstance(wrapped, DDP)
        return wrapped, opt, ist

    def train(wrapped: Any, opt: Any, steps: range, selections: list[list[int]], ist: ISTAdamW) -> None:
        for step in steps:
            selections.append(ist.active_layers)
            accelerator.backward(wrapped(**rank_batch(step, rank)).loss)
            opt.step()
            opt.zero_grad()
            if step + 1 == STEPS // 2:
                accelerator.save_state(checkpoint)

    wrapped, opt, ist = prepared(IST_OPTIONS["seed"])
    selections: list[list[int]] = []
    train(wrapped, opt, range(STEPS), selections, ist)
    full = summary(wrapped, ist, selections)

    # Resume in fresh objects (another seed: the checkpoint's generator state must win).
    accelerator.free_memory()  # forget the first run's model and optimizer
    wrapped, opt, ist = prepared(99)
    accelerator.load_state(checkpoint)
    assert ist.num_steps == STEPS // 2
    resumed_selections = selections[: STEPS // 2]
    train(wrapped, opt, range(STEPS // 2, STEPS), resumed_selections, ist)
    return {"full": full, "resumed": summary(wrapped, ist, resumed_selections)}


def test_accelerate_prepare_ranks_agree_match_one_process_and_resume(tmp_path):
    results = run_workers(_accelerate_train, tmp_path, str(tmp_path / "accelerate-state"))
    assert_ranks_agree_and_match_reference([r["full"] for r in results], single_process_reference())
    assert_ranks_agree_and_match_reference([r["resumed"] for r in results], results[0]["full"])


TRAINER_STEPS = 8


def trainer_dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    return [{k: v[0] for k, v in lm_batch(batch=1, seq=8, seed=i).items()} for i in range(n)]


def run_trainer(output_dir: str, batch_size: int, seed: int, resume: str | None = None) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class RecordSelections(TrainerCallback):
        def __init__(self) -> None:
            self.selections: list[list[int]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.selections.append(ist.active_layers)

    model = tiny_peft_llama(dtype=torch.float64)
    ist = ISTAdamW(model, lr=1e-2, **{**IST_OPTIONS, "seed": seed})
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=2,
        max_steps=TRAINER_STEPS,
        save_strategy="steps",
        save_steps=TRAINER_STEPS // 2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,  # a backend alone makes accelerate distributed
        ddp_find_unused_parameters=True,  # unselected layers get no gradient (README, Multi-GPU)
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    record = RecordSelections()
    trainer = Trainer(
        model=model, args=args, train_dataset=trainer_dataset(), optimizers=(ist, None), callbacks=[record]
    )
    trainer.train(resume_from_checkpoint=resume)
    return summary(model, ist, record.selections)


def _trainer_train(rank: int, output_dir: str) -> dict[str, Any]:
    full = run_trainer(output_dir + "/full", batch_size=2, seed=IST_OPTIONS["seed"])
    assert dist.is_initialized() and dist.get_world_size() == WORLD  # Trainer ran DDP
    resumed = run_trainer(
        output_dir + "/resumed", batch_size=2, seed=99, resume=f"{output_dir}/full/checkpoint-{TRAINER_STEPS // 2}"
    )
    return {"full": full, "resumed": resumed}


def test_trainer_ranks_agree_match_one_process_and_resume(tmp_path):
    results = run_workers(_trainer_train, tmp_path, str(tmp_path / "trainer"))
    reference = run_trainer(str(tmp_path / "single"), batch_size=4, seed=IST_OPTIONS["seed"])
    full = [r["full"] for r in results]
    assert_ranks_agree_and_match_reference(full, reference, steps=TRAINER_STEPS)
    # Trainer records only the steps it runs after resuming.
    half = TRAINER_STEPS // 2
    resumed = [
        {**r["resumed"], "selections": r["full"]["selections"][:half] + r["resumed"]["selections"]} for r in results
    ]
    assert_ranks_agree_and_match_reference(resumed, full[0], steps=TRAINER_STEPS)


# ---------------------------------------------------------------------- fail fast
def _attempt(build: Callable[[], Any]) -> str | None:
    """The error ``build()`` raised (type and message), or ``None``."""
    try:
        build()
    except (ValueError, RuntimeError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _unsupported_setups(rank: int) -> dict[str, str | None]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank)

    def ddp(**kwargs: Any) -> DDP:
        return DDP(tiny_peft_llama(), **kwargs)

    def reentrant(model: torch.nn.Module) -> torch.nn.Module:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        return model

    def wrapped_later(wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> Callable[[], Any]:
        def run() -> None:  # the order of accelerate.prepare and Trainer: IST first, the wrapper at train time
            model = tiny_peft_llama()
            opt = ISTAdamW(model, **IST_OPTIONS)  # noqa: F841 (kept alive: its hooks go with it)
            wrapped = wrap(model)
            wrapped(**rank_batch(0, rank)).loss.backward()

        return run

    def fsdp1(use_orig_params: bool) -> FSDP1:
        block = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))  # all trainable: FSDP1 accepts it
        return FSDP1(block, use_orig_params=use_orig_params, device_id=torch.device("cpu"))

    def sgd_ist(model: torch.nn.Module) -> IST:
        return IST(torch.optim.SGD(model.parameters(), lr=0.1), model, num_probes=0)

    errors = {
        "ddp-find-unused-false": _attempt(lambda: ISTAdamW(ddp(find_unused_parameters=False), **IST_OPTIONS)),
        "ddp-static-graph": _attempt(
            lambda: ISTAdamW(ddp(find_unused_parameters=True, static_graph=True), **IST_OPTIONS)
        ),
        "ddp-reentrant-checkpointing": _attempt(
            lambda: ISTAdamW(DDP(reentrant(tiny_peft_llama()), find_unused_parameters=True), **IST_OPTIONS)
        ),
        "late-ddp-find-unused-false": _attempt(wrapped_later(lambda m: DDP(m, find_unused_parameters=False))),
        "late-ddp-reentrant-checkpointing": _attempt(
            wrapped_later(lambda m: DDP(reentrant(m), find_unused_parameters=True))
        ),
        "fsdp1-flat-params": _attempt(lambda: sgd_ist(fsdp1(False))),
        "fsdp1-orig-params": _attempt(lambda: sgd_ist(fsdp1(True))),
        "late-fsdp1": _attempt(wrapped_later(lambda m: FSDP1(m, use_orig_params=True, device_id=torch.device("cpu")))),
        "late-fully-shard": _attempt(wrapped_later(lambda m: fully_shard(m))),
        # Supported: non-reentrant checkpointing under DDP builds and trains.
        "ddp-non-reentrant-checkpointing": _attempt(
            wrapped_later(
                lambda m: DDP(
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}) or m,
                    find_unused_parameters=True,
                )
            )
        ),
    }
    return errors


UNSUPPORTED = {
    "ddp-find-unused-false": "ValueError: IST under DistributedDataParallel needs find_unused_parameters=True",
    "ddp-static-graph": "ValueError: IST under DistributedDataParallel cannot use static_graph=True",
    "ddp-reentrant-checkpointing": "ValueError: IST under DistributedDataParallel cannot use reentrant gradient",
    "late-ddp-find-unused-false": "ValueError: IST under DistributedDataParallel needs find_unused_parameters=True",
    "late-ddp-reentrant-checkpointing": "ValueError: IST under DistributedDataParallel cannot use reentrant gradient",
    "fsdp1-flat-params": "ValueError: IST cannot train an FSDP1 model with use_orig_params=False",
    "fsdp1-orig-params": "ValueError: IST does not support FSDP1",
    "late-fsdp1": "ValueError: IST does not support FSDP1",
    "late-fully-shard": "ValueError: IST: the model's parameters were replaced after IST was built",
    "ddp-non-reentrant-checkpointing": None,
}


@pytest.fixture(scope="module")
def unsupported_errors(tmp_path_factory) -> list[dict[str, str | None]]:
    return run_workers(_unsupported_setups, tmp_path_factory.mktemp("unsupported"))


@pytest.mark.parametrize("setup", list(UNSUPPORTED))
def test_unsupported_setup_raises_its_documented_error(unsupported_errors, setup):
    for errors in unsupported_errors:  # on every rank
        expected = UNSUPPORTED[setup]
        if expected is None:
            assert errors[setup] is None, errors[setup]
        else:
            assert errors[setup] is not None and errors[setup].startswith(expected), errors[setup]


# ---------------------------------------------------------------------- consistency check
def _consistency(rank: int) -> dict[str, str | None]:
    init_gloo(rank)

    def run(seed: int | None, check: bool | None, diverge_at: int | None = None, torch_seed: int = 0) -> None:
        ddp = DDP(tiny_peft_llama(), find_unused_parameters=True)
        torch.manual_seed(torch_seed)  # the global seed IST's default follows
        opt = ISTAdamW(ddp, lr=1e-2, **{**IST_OPTIONS, "seed": seed}, check_consistency=check)
        for step in range(4):
            ddp(**rank_batch(step, rank)).loss.backward()
            if step == diverge_at and rank == 1:
                opt.scheduler.importance[0] += 1.0  # what a rank-local probe loss would do
            opt.step()
            opt.zero_grad()

    errors = {
        "agree": _attempt(lambda: run(seed=3, check=True)),
        "seed-per-rank": _attempt(lambda: run(seed=rank, check=None)),  # caught at the first step, always
        # The default seed follows torch.initial_seed(), seeded per rank here as launchers do: rank 0's wins.
        "default-seed": _attempt(lambda: run(seed=None, check=True, torch_seed=100 + rank)),
        "diverged-checked": _attempt(lambda: run(seed=3, check=True, diverge_at=2)),
        "diverged-unchecked": _attempt(lambda: run(seed=3, check=False, diverge_at=2)),
    }
    os.environ["IST_CHECK_CONSISTENCY"] = "1"
    errors["diverged-env"] = _attempt(lambda: run(seed=3, check=None, diverge_at=2))
    return errors


def test_consistency_check_raises_when_ranks_disagree(tmp_path):
    disagree = "RuntimeError: IST: ranks disagree on the layer selection or importance"
    for errors in run_workers(_consistency, tmp_path):
        assert errors["agree"] is None, errors["agree"]
        assert errors["default-seed"] is None, errors["default-seed"]
        for case in ("seed-per-rank", "diverged-checked", "diverged-env"):
            assert errors[case] is not None and errors[case].startswith(disagree), (case, errors[case])
        assert "rank 0: {'step': 3" in errors["diverged-checked"]  # the step after the divergence
        assert errors["diverged-unchecked"] is None  # opt-in: without it, divergence is silent (as in DDP)


def _one_rank_without_a_probe_loss(rank: int) -> dict[str, Any]:
    init_gloo(rank)
    model = DDP(tiny_peft_llama(), find_unused_parameters=True)
    opt = ISTAdamW(model, lr=1e-2, **IST_OPTIONS)
    for step in range(4):
        batch = rank_batch(step, rank)
        if rank == 1:  # this rank computes its loss outside the model: its probe forwards have loss=None
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        else:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {
        "skipped": opt.scheduler.num_skipped,
        "updates": opt.scheduler.num_updates,
        "importance": opt.scheduler.importance.clone(),
        "active": opt.active_layers,
    }


def test_a_rank_with_nothing_to_probe_makes_every_rank_skip_instead_of_hanging(tmp_path):
    first, second = run_workers(_one_rank_without_a_probe_loss, tmp_path)
    assert first["skipped"] == second["skipped"] == 2 and first["updates"] == second["updates"] == 0
    assert torch.equal(first["importance"], second["importance"]) and first["active"] == second["active"]


def _load_on_one_rank(rank: int) -> str:
    init_gloo(rank)
    model = DDP(tiny_peft_llama(), find_unused_parameters=True)
    opt = ISTAdamW(model, lr=1e-2, check_consistency=True, **IST_OPTIONS)

    def step(i: int) -> None:
        model(**rank_batch(i, rank)).loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)
    saved = opt.state_dict()
    step(1)
    step(2)
    if rank == 0:
        opt.load_state_dict(saved)  # the mistake: a checkpoint loaded on some ranks only
    try:
        step(3)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_checkpoint_loaded_on_one_rank_only_is_caught_without_a_hang(tmp_path):
    messages = run_workers(_load_on_one_rank, tmp_path)
    assert all("ranks disagree" in message for message in messages), messages


def _layerwise_cka_bad_batch_on_one_rank(rank: int, wrapper: str) -> str:
    from ist_optim import LayerwiseCKA

    init_gloo(rank)
    if wrapper == "ddp":
        model = DDP(tiny_peft_llama(), find_unused_parameters=True)
    else:  # FSDP2: every forward all-gathers, so the batches are checked before the first
        from torch.distributed.fsdp import fully_shard

        model = tiny_peft_llama()
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
    batch = lm_batch(batch=2, seq=8, seed=rank)
    calibration = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
    if rank == 1:  # the mistake, on one rank: a row with no real token
        calibration["attention_mask"][0] = 0
    try:
        ISTAdamW(model, lr=1e-2, policy=LayerwiseCKA([calibration], active_layers=0.5))
    except (ValueError, RuntimeError) as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_layerwise_cka_failing_on_one_rank_fails_every_rank_without_a_hang(tmp_path, wrapper):
    first, second = run_workers(_layerwise_cka_bad_batch_on_one_rank, tmp_path, wrapper)
    assert "failed on rank(s) [1]" in first, first
    assert "no token with attention_mask 1" in second, second
