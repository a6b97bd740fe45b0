"""HF Trainer with ISTAdamW passed as the optimizer (gradient accumulation, save_steps and resume work as with AdamW).

For a Trainer that builds the optimizer itself (TRL), see trl_sft.py and docs/integrations.md.
"""

import tempfile

from _tiny import base_model, batches, parse_args
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from ist_optim import ISTAdamW

args = parse_args(__doc__, steps=4)
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
model = get_peft_model(base_model(args.smollm2), lora)
rows = batches(args.steps * 2, model.config.vocab_size)
train_set = [{k: v[i] for k, v in b.items()} for b in rows for i in range(4)]

with tempfile.TemporaryDirectory() as out:
    # --8<-- [start:trainer]
    opt = ISTAdamW(model, lr=2e-3, weight_decay=0.0, active_layers=0.25)
    targs = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=args.steps,
        save_steps=500,
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, optimizers=(opt, None))
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)
    # --8<-- [end:trainer]
print("trained layers at the end:", opt.active_layers, "loss", trainer.state.log_history[-1].get("train_loss"))
