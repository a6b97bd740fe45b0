"""ist_optim.integrations: HF Trainer / TRL through ISTAdamWFactory and use_ist, axolotl, ms-swift; refusals.

Every run is compared against the same run with an ISTAdamW built by hand and passed with ``optimizers=``
(bit for bit on CPU), and per step the parameters that moved are checked against the optimizer's selection.
Tiny config-built models, a word-level tokenizer and datasets made here: no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, lm_batch, tiny_llama, tiny_peft_llama

import ist_optim.distributed as distributed
from ist_optim import ISTAdamW, ISTAdamWFactory
from ist_optim.integrations import FSDP_REFUSAL, use_ist

pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from ist_optim.integrations.callback import ISTCallback, find_ist  # noqa: E402

OPTIONS = dict(active_layers=0.5, probe_interval=2, importance_lr=100.0, seed=3)
LR = 2e-2


def rows(n: int = 16):
    return [{k: v[0] for k, v in lm_batch(batch=1, seq=8, seed=i).items()} for i in range(n)]


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Recorder(TrainerCallback):
    """Per optimizer step: the selection, the layers whose parameters moved, the lr the step used."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.ist = find_ist(optimizer)
        self.before = [[p.detach().clone() for p in params] for params in self.ist.layer_map.params]
        self.active = list(self.ist.active_layers)
        self.lr = self.ist.optimizer.param_groups[0]["lr"]  # the wrapped AdamW's: what the step uses

    def on_optimizer_step(self, args, state, control, **kwargs):
        moved = [
            i
            for i, params in enumerate(self.ist.layer_map.params)
            if any(not torch.equal(b, p) for b, p in zip(self.before[i], params, strict=True))
        ]
        self.steps.append((self.active, moved, self.lr))


def check_only_selected_moved(recorder, num_steps):
    assert len(recorder.steps) == num_steps
    for active, moved, lr in recorder.steps:
        assert moved == (active if lr > 0 else [])  # a warmup's lr 0 moves nothing
    assert len({tuple(a) for a, _, _ in recorder.steps}) > 1  # the selection changes


def hf_args(output_dir, max_steps=6, **extra):
    kw = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        learning_rate=LR,
        warmup_steps=2,
        lr_scheduler_type="linear",
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kw.update(extra)
    return TrainingArguments(**kw)


# ---------------------------------------------------------------------- Trainer + factory
@pytest.mark.parametrize("extra", [{}, {"bf16": True, "gradient_checkpointing": True}], ids=["fp32", "bf16-gc"])
def test_trainer_factory_equals_hand_built_ist(tmp_path, extra):
    recorders = []
    finals = []
    for mode in ("factory", "hand"):
        model = tiny_peft_llama()
        rec = Recorder()
        recorders.append(rec)
        args = hf_args(tmp_path / mode, **extra)
        if mode == "factory":
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=rows(),
                callbacks=[rec],
                optimizer_cls_and_kwargs=(ISTAdamWFactory, {"lr": LR, **OPTIONS}),
            )
        else:
            opt = ISTAdamW(model, lr=LR, **OPTIONS)
            trainer = Trainer(model=model, args=args, train_dataset=rows(), callbacks=[rec], optimizers=(opt, None))
        trainer.train()
        ist = find_ist(trainer.optimizer)
        assert ist.num_steps == 6 and ist.scheduler.num_updates == 3 and ist.num_probe_updates_missed == 0
        check_only_selected_moved(rec, 6)
        finals.append(adapters(model))
    assert_same(*finals)
    assert recorders[0].steps == recorders[1].steps
    lrs = [lr for _, _, lr in recorders[0].steps]
    assert lrs[:3] == [0.0, pytest.approx(LR / 2), pytest.approx(LR)]  # the trainer's warmup drives IST's lr
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # then its linear decay


def test_factory_refuses_bad_input():
    model = tiny_peft_llama()
    with pytest.raises(TypeError, match="needs lr"):
        ISTAdamWFactory()(model, active_layers=0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        ISTAdamWFactory()("model", lr=1e-3)
    with pytest.raises(TypeError):
        ISTAdamWFactory()(model, lr=1e-3, no_such_option=1)
    assert not isinstance(ISTAdamWFactory, type(torch.optim.Optimizer)) or not issubclass(
        ISTAdamWFactory, torch.optim.Optimizer
    )
    from transformers.trainer_optimizer import is_optimizer_factory

    assert is_optimizer_factory(ISTAdamWFactory)


def test_factory_takes_adamw_settings_from_training_args(tmp_path):
    args = hf_args(tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-6)
    opt = ISTAdamWFactory()(tiny_peft_llama(), args, **OPTIONS)  # axolotl's call
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (LR, 0.1, (0.8, 0.999), 1e-6)
    opt = ISTAdamWFactory()(tiny_peft_llama(), args, lr=1e-3, **OPTIONS)  # kwargs win
    assert opt.param_groups[0]["lr"] == 1e-3


# ---------------------------------------------------------------------- TRL
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def text_dataset(n=16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (10,), generator=g)) for _ in range(n)]
    return Dataset.from_dict({"text": texts})


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def sft_config(output_dir, max_steps=8):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        learning_rate=LR,
        save_steps=4,
        save_strategy="steps",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        max_length=16,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def test_sft_trainer_with_peft_config_factory_hand_built_and_exact_resume(tmp_path):
    pytest.importorskip("trl")
    from peft import LoraConfig, get_peft_model
    from trl import SFTTrainer

    tokenizer, data = word_tokenizer(), text_dataset()
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)  # the "model name" a resumed run loads

    # 1. SFTTrainer builds the peft model itself; IST comes from the factory (one added argument).
    rec = Recorder()
    sft = SFTTrainer(
        model=tiny_llama(),
        args=sft_config(tmp_path / "sft"),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[rec],
        optimizer_cls_and_kwargs=(ISTAdamWFactory, {"lr": LR, **OPTIONS}),
    )
    start = {k: v.clone() for k, v in sft.model.state_dict().items() if "lora_" in k}
    sft.train()
    ist = find_ist(sft.optimizer)
    assert ist.num_steps == 8 and ist.scheduler.num_updates == 4 and ist.scheduler.num_skipped == 0
    assert ist.num_probe_updates_missed == 0 and bool((ist.scheduler.importance != 0).any())  # probes ran
    check_only_selected_moved(rec, 8)
    final = adapters(sft.model)

    # 2. The same run by hand: get_peft_model with the same adapters, ISTAdamW passed with optimizers=.
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    model.load_state_dict(start, strict=False)
    hand_rec = Recorder()
    hand = SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "hand"),
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[hand_rec],
        optimizers=(ISTAdamW(model, lr=LR, **OPTIONS), None),
    )
    hand.train()
    assert_same(final, adapters(model))
    assert hand_rec.steps == rec.steps

    # 3. Resume from step 4, the model given by name (a local directory): the uninterrupted run, bit for bit.
    resumed = SFTTrainer(
        model=str(base_dir),
        args=sft_config(tmp_path / "resumed"),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        optimizer_cls_and_kwargs=(ISTAdamWFactory, {"lr": LR, **OPTIONS}),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "sft" / "checkpoint-4"))
    resumed_ist = find_ist(resumed.optimizer)
    assert resumed_ist.num_steps == 8 and torch.equal(resumed_ist.scheduler.importance, ist.scheduler.importance)
    assert_same(final, adapters(resumed.model))


def preference_dataset(n=8):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (k,), generator=g))

    return Dataset.from_dict(
        {
            "prompt": [words(4) for _ in range(n)],
            "chosen": [words(3) for _ in range(n)],
            "rejected": [words(3) for _ in range(n)],
        }
    )


def dpo_config(output_dir, **extra):
    from trl import DPOConfig

    kw = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=LR,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        bf16=False,
        max_length=16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    return DPOConfig(**{**kw, **extra})


def test_dpo_trainer_with_use_ist_equals_hand_built(tmp_path):
    pytest.importorskip("trl")
    from trl import DPOTrainer

    tokenizer, data = word_tokenizer(), preference_dataset()
    finals, records = [], []
    for mode in ("use_ist", "hand"):
        model = tiny_peft_llama()
        rec = Recorder()
        args = dpo_config(tmp_path / mode)
        if mode == "use_ist":
            trainer = DPOTrainer(
                model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[rec]
            )
            use_ist(trainer, **OPTIONS)  # the one line; lr from args
        else:
            opt = ISTAdamW(model, lr=LR, **OPTIONS)
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
                callbacks=[rec],
                optimizers=(opt, None),
            )
        trainer.train()
        assert find_ist(trainer.optimizer).num_steps == 4
        check_only_selected_moved(rec, 4)
        finals.append(adapters(model))
        records.append(rec.steps)
    assert_same(*finals)
    assert records[0] == records[1]


def test_dpo_trainer_with_gradient_checkpointing(tmp_path):
    """peft's disable_adapter() (DPO's reference forward) turns every adapter on when it exits, between the
    policy forward and its backward; non-reentrant checkpointing then recomputed the unselected layers with grad
    (CheckpointError: saved tensors differ) until IST turned such writes off at once."""
    pytest.importorskip("trl")
    from trl import DPOTrainer

    model = tiny_peft_llama()
    rec = Recorder()
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(tmp_path, max_steps=3, gradient_checkpointing=True),
        train_dataset=preference_dataset(),
        processing_class=word_tokenizer(),
        callbacks=[rec],
    )
    use_ist(trainer, **OPTIONS)
    trainer.train()
    check_only_selected_moved(rec, 3)


def test_use_ist_refuses_bad_input_and_callback_refuses_a_replaced_optimizer(tmp_path):
    model = tiny_peft_llama()
    with pytest.raises(ValueError, match="already has an optimizer"):
        use_ist(
            Trainer(
                model=model, args=hf_args(tmp_path), train_dataset=rows(), optimizers=(ISTAdamW(model, lr=LR), None)
            )
        )
    other = Trainer(
        model=tiny_peft_llama(),
        args=hf_args(tmp_path),
        train_dataset=rows(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        use_ist(other)

    class OwnOptimizer(Trainer):  # a trainer whose create_optimizer ignores optimizer_cls_and_kwargs
        def create_optimizer(self, model=None):
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
            return self.optimizer

    model = tiny_peft_llama()
    before = adapters(model)
    trainer = use_ist(OwnOptimizer(model=model, args=hf_args(tmp_path), train_dataset=rows()), **OPTIONS)
    assert sum(isinstance(cb, ISTCallback) for cb in trainer.callback_handler.callbacks) == 1
    with pytest.raises(RuntimeError, match="not with IST"):
        trainer.train()
    assert_same(before, adapters(model))  # refused before the first step


# ---------------------------------------------------------------------- refusals: FSDP, DeepSpeed (stand-ins)
@pytest.fixture
def accelerate_state(monkeypatch):
    from accelerate.state import AcceleratorState, PartialState

    def set_state(shared):
        monkeypatch.setattr(AcceleratorState, "_shared_state", shared)
        monkeypatch.setattr(PartialState, "_shared_state", {})

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    return set_state


def test_factory_refuses_fsdp_through_accelerate(accelerate_state, monkeypatch):
    from accelerate.utils import DistributedType

    model = tiny_peft_llama()
    accelerate_state({"distributed_type": DistributedType.FSDP, "fsdp_plugin": object()})  # Trainer's is_fsdp_enabled
    with pytest.raises(ValueError, match="under FSDP") as error:
        ISTAdamWFactory()(model, lr=1e-3)
    assert "fully_shard" in str(error.value) and str(error.value).startswith(FSDP_REFUSAL.split("{")[0])
    accelerate_state({})  # before the Accelerator exists: the launcher's variable
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="ACCELERATE_USE_FSDP"):
        ISTAdamWFactory()(model, lr=1e-3)
    accelerate_state({"distributed_type": DistributedType.MULTI_CPU, "fsdp_plugin": None})  # accelerate ignored it
    assert isinstance(ISTAdamWFactory()(model, lr=1e-3), ISTAdamW)


def test_deepspeed_refused_at_construction(accelerate_state, monkeypatch):
    from accelerate.utils import DistributedType

    model = tiny_peft_llama()
    accelerate_state({"distributed_type": DistributedType.DEEPSPEED})
    for build in (lambda: ISTAdamW(model, lr=1e-3), lambda: ISTAdamWFactory()(model, lr=1e-3)):
        with pytest.raises(ValueError, match="cannot train under DeepSpeed: accelerate runs DeepSpeed") as e:
            build()
        assert "flat buffers" in str(e.value) and "DDP" in str(e.value) and "FSDP2" in str(e.value)
    accelerate_state({})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # TrainingArguments(deepspeed=...) sets it
    with pytest.raises(ValueError, match="ACCELERATE_USE_DEEPSPEED"):
        ISTAdamW(model, lr=1e-3)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")

    engine_cls = type("DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = engine_cls()
    engine.module = model
    with pytest.raises(ValueError, match=r"wrapped by DeepSpeed \(DeepSpeedEngine\)"):
        ISTAdamW(engine, lr=1e-3)
    other = tiny_peft_llama()
    next(p for p in other.parameters() if p.requires_grad).ds_id = 0  # what ZeRO-3 partitioning leaves
    with pytest.raises(ValueError, match="ZeRO-3"):
        ISTAdamW(other, lr=1e-3)


def test_deepspeed_engine_calling_the_model_is_refused_at_the_first_forward(accelerate_state, monkeypatch):
    # A stand-in engine whose forward runs in a module named like DeepSpeed's (the real one: the subprocess test).
    monkeypatch.setattr(distributed, "_DEEPSPEED_INSTALLED", True)
    monkeypatch.setitem(sys.modules, "deepspeed", sys.modules.get("deepspeed", type(sys)("deepspeed")))
    namespace = {"__name__": "deepspeed.runtime.engine"}
    exec("def engine_forward(model, batch):\n    return model(**batch)\n", namespace)
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-3, **OPTIONS)  # built before DeepSpeed was visible
    with pytest.raises(ValueError, match="a DeepSpeed engine is calling the model"):
        namespace["engine_forward"](model, lm_batch())
    assert opt.num_steps == 0
    model(**lm_batch()).loss.backward()  # checked once: a plain forward afterwards trains
    opt.step()


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    from conftest import tiny_peft_llama, lm_batch
    from transformers import Trainer, TrainingArguments
    from ist_optim import ISTAdamW, ISTAdamWFactory
    from ist_optim.integrations import use_ist

    data = [{k: v[0] for k, v in lm_batch(batch=1, seq=8, seed=i).items()} for i in range(8)]
    zero2 = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
             "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    def args(): return TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=2, max_steps=3,
                                         report_to=[], deepspeed=zero2, save_strategy="no", disable_tqdm=True)
    def lora(m): return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
    def refused(run, where):
        try:
            run()
        except ValueError as e:
            assert "cannot train under DeepSpeed" in str(e) and "FSDP2" in str(e), e
            print("REFUSED", where)
        else:
            print("NOT REFUSED", where)

    model = tiny_peft_llama(); before = lora(model)
    opt = ISTAdamW(model, lr=1e-2)  # built before TrainingArguments(deepspeed=...): refused at the first forward
    refused(lambda: Trainer(model=model, args=args(), train_dataset=data, optimizers=(opt, None)).train(),
            "optimizers=")
    assert opt.num_steps == 0 and all(torch.equal(before[k], v) for k, v in lora(model).items())
    args()  # TrainingArguments(deepspeed=...) exists now (its PartialState runs DeepSpeed): refused when IST is built
    refused(lambda: ISTAdamW(tiny_peft_llama(), lr=1e-2), "construction")
    refused(lambda: Trainer(model=tiny_peft_llama(), args=args(), train_dataset=data,
                            optimizer_cls_and_kwargs=(ISTAdamWFactory, {"lr": 1e-2})).train(), "factory")
    refused(lambda: use_ist(Trainer(model=tiny_peft_llama(), args=args(), train_dataset=data)), "use_ist")
    import deepspeed
    model = tiny_peft_llama()
    config = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
              "zero_optimization": {"stage": 2}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    refused(lambda: ISTAdamW(engine, lr=1e-2), "engine")
""")


def test_deepspeed_really_installed_is_refused_everywhere(tmp_path):
    """Real DeepSpeed on CPU (ZeRO-2 through Trainer; deepspeed.initialize), in a subprocess (it starts a group)."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds.py"
    script.write_text(DEEPSPEED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    port = str(29500 + os.getpid() % 1000)
    result = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent), str(tmp_path / "out"), port],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if "REFUSED" in line]
    assert lines == [f"REFUSED {w}" for w in ("optimizers=", "construction", "factory", "use_ist", "engine")], lines


# ---------------------------------------------------------------------- axolotl, ms-swift
def test_axolotl_plugin_sets_the_optimizer_through_post_trainer_create(tmp_path):
    """Against the installed axolotl's PluginManager and its trainers' OptimizerMixin (axolotl installed --no-deps)."""
    pytest.importorskip("axolotl.integrations.base")
    mixin = pytest.importorskip("axolotl.core.trainers.mixins.optimizer")
    from dataclasses import dataclass

    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.utils.dict import DictDefault

    from ist_optim.integrations.axolotl import ISTArgs, ISTPlugin

    @dataclass
    class AxolotlArgs(TrainingArguments):  # the fields OptimizerMixin reads from AxolotlTrainingArguments
        loraplus_lr_ratio: float | None = None
        embedding_lr_scale: float | None = None
        embedding_lr: float | None = None
        lr_groups: list | None = None

    class AxolotlLikeTrainer(mixin.OptimizerMixin):
        pass

    name = "ist_optim.integrations.axolotl.ISTPlugin"
    assert issubclass(ISTPlugin, BasePlugin)
    assert ISTPlugin().get_input_args() == "ist_optim.integrations.axolotl.ISTArgs"
    cfg = DictDefault(
        {
            "plugins": [name],
            "ist_active_layers": 0.5,
            "ist_probe_interval": 2,
            "ist_importance_lr": 100.0,
            "ist_seed": 3,
        }
    )
    ISTArgs(**{k: v for k, v in cfg.items() if k.startswith("ist_")})  # the schema accepts the fields
    with pytest.raises(ValueError):
        ISTArgs(ist_probe_interval="often")
    manager = PluginManager.get_instance()
    manager.register(name)
    try:
        assert isinstance(manager.plugins[name], ISTPlugin)
        manager.cfg = cfg
        finals, records = [], []
        for mode in ("plugin", "hand"):
            model = tiny_peft_llama()
            rec = Recorder()
            kw = {k: v for k, v in vars(hf_args(tmp_path / mode)).items() if not k.startswith("_")}
            kw.pop("distributed_state", None)
            args = AxolotlArgs(**{k: v for k, v in kw.items() if k in AxolotlArgs.__dataclass_fields__})
            if mode == "plugin":
                trainer = AxolotlLikeTrainer(model=model, args=args, train_dataset=rows(), callbacks=[rec])
                manager.post_trainer_create(cfg, trainer)  # what axolotl/train.py calls
            else:
                opt = ISTAdamW(model, lr=LR, **OPTIONS)
                trainer = AxolotlLikeTrainer(
                    model=model, args=args, train_dataset=rows(), callbacks=[rec], optimizers=(opt, None)
                )
            trainer.train()
            check_only_selected_moved(rec, 6)
            finals.append(adapters(model))
            records.append(rec.steps)
        assert_same(*finals)
        assert records[0] == records[1]
    finally:
        manager.plugins.pop(name, None)


SWIFT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import importlib
    import pytest
    from test_integrations import LR, hf_args, rows
    from conftest import tiny_peft_llama
    from transformers import Trainer
    from ist_optim import ISTAdamW
    plugin = importlib.import_module("ist_optim.integrations.swift_plugin")
    from swift.optimizers import optimizers_map

    assert optimizers_map["ist"] is plugin.ISTOptimizerCallback
    assert plugin.parse_optim_args("active_layers=0.5, probe_interval=2,rule=paper") == {
        "active_layers": 0.5, "probe_interval": 2, "rule": "paper"}
    with pytest.raises(ValueError, match="key=value"):
        plugin.parse_optim_args("active_layers")
    args = hf_args(sys.argv[2], optim_args="active_layers=0.5,probe_interval=2,seed=3,importance_lr=100.0")
    trainer = Trainer(model=tiny_peft_llama(), args=args, train_dataset=rows())
    callback = optimizers_map["ist"](args, trainer)  # what swift's trainer mixin builds for --optimizer ist
    callback.create_optimizer_and_scheduler(num_training_steps=6)
    assert isinstance(trainer.optimizer, ISTAdamW) and trainer.optimizer.options["active_layers"] == 0.5
    assert trainer.optimizer.param_groups[0]["initial_lr"] == LR and trainer.lr_scheduler is not None
    print("SWIFT OK")
""")


def test_ms_swift_external_plugin_registers_optimizer_ist(tmp_path):
    """Smoke test against the installed ms-swift's optimizers_map (ms-swift installed --no-deps).

    In a subprocess: importing ``swift.optimizers`` monkey-patches transformers' default Trainer callbacks
    process-wide (``swift.trainers.patcher``: a DefaultFlowCallback reading swift-only ``args.max_epochs``),
    which breaks every later plain ``Trainer`` run in the same process.
    """
    pytest.importorskip("swift")
    import transformers.trainer as hf_trainer

    before = list(hf_trainer.DEFAULT_CALLBACKS)
    script = tmp_path / "swift_check.py"
    script.write_text(SWIFT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "SWIFT OK" in result.stdout
    assert hf_trainer.DEFAULT_CALLBACKS == before  # this process's Trainer is untouched
