"""Any torch optimizer through IST(...): here SGD with momentum, a quarter of the layers per step."""

import torch
from _tiny import base_model, batches, parse_args
from peft import LoraConfig, get_peft_model

from ist_optim import IST

args = parse_args(__doc__)
model = get_peft_model(base_model(args.smollm2), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

# --8<-- [start:ist]
opt = IST(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, active_layers=0.25)
# --8<-- [end:ist]
for batch in batches(args.steps, model.config.vocab_size):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"loss {loss.item():.3f}  trained layers {opt.active_layers}")
