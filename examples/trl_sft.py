"""TRL SFTTrainer building ISTAdamW itself through ist_optim.ISTAdamWFactory (see docs/integrations.md).

Skips (exit 0) when TRL or the factory is not installed.
"""

import sys
import tempfile

from _tiny import base_model, parse_args, tiny_tokenizer

try:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ist_optim import ISTAdamWFactory
except ImportError as e:  # TRL is optional
    print(f"skipped: {e}")
    sys.exit(0)
from peft import LoraConfig

args = parse_args(__doc__, steps=3)
model = base_model(args.smollm2)
tokenizer = tiny_tokenizer()
data = Dataset.from_list([{"input_ids": list(range(i, i + 12))} for i in range(32)])

with tempfile.TemporaryDirectory() as out:
    # --8<-- [start:trl]
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=data,
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        args=SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=4, report_to=[], use_cpu=True),
        optimizer_cls_and_kwargs=(ISTAdamWFactory, {"lr": 2e-3, "active_layers": 0.25}),
    )
    trainer.train()
    # --8<-- [end:trl]
print("optimizer:", type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__)
