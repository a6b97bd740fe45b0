"""accelerate: build IST, then prepare(model, opt). One process here; under `accelerate launch` on several,
find_unused_parameters=True is required (unselected layers get no gradient)."""

from _tiny import base_model, batches, parse_args
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from peft import LoraConfig, get_peft_model

from ist_optim import ISTAdamW

args = parse_args(__doc__)
model = get_peft_model(base_model(args.smollm2), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

# --8<-- [start:accelerate]
accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
opt = ISTAdamW(model, lr=2e-3, active_layers=0.25)
model, opt = accelerator.prepare(model, opt)
for batch in batches(args.steps, 256):
    loss = model(**batch).loss
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    # --8<-- [end:accelerate]
    accelerator.print(f"loss {loss.item():.3f}")
