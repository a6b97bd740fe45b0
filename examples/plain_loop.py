"""A plain training loop: peft LoRA on every layer, ISTAdamW training a quarter of the layers per step."""

import torch
from _tiny import base_model, batches, parse_args
from peft import LoraConfig, get_peft_model

from ist_optim import ISTAdamW

args = parse_args(__doc__)
base = base_model(args.smollm2)
vocab = base.config.vocab_size

# --8<-- [start:loop]
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
opt = ISTAdamW(model, lr=2e-3, active_layers=0.25, probe_interval=2)  # LoRA-all's lr / active_layers
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
for batch in batches(args.steps, vocab):
    loss = model(**batch).loss
    loss.backward()  # only this step's layers get gradients
    opt.step()
    sched.step()
    opt.zero_grad()
    print(f"loss {loss.item():.3f}  trained layers {opt.active_layers}")
# --8<-- [end:loop]
print("importance:", [round(v, 5) for v in opt.scheduler.importance.tolist()])
