"""DDP with torchrun: each rank trains its own batches; IST picks the same layers on every rank.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py     # gloo on CPU, nccl on GPUs

Run with plain ``python`` it launches itself that way (2 processes).
"""

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from _tiny import base_model, batches, parse_args
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel as DDP

from ist_optim import ISTAdamW

args = parse_args(__doc__)
if "RANK" not in os.environ:  # not under torchrun: start it
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        *sys.argv[1:],
    ]
    sys.exit(subprocess.call(command))

# --8<-- [start:ddp]
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
base = base_model(args.smollm2).to(device)  # the same weights on every rank (seeded)
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
# unselected layers get no gradient in a step: DDP must be told (IST refuses the wrapper otherwise)
ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
opt = ISTAdamW(ddp, lr=2e-3, active_layers=0.25, probe_interval=2)  # the DDP wrapper, not the inner model
for step, batch in enumerate(batches(2 * args.steps, base.config.vocab_size)):
    if step % dist.get_world_size() != rank:
        continue  # a stand-in for DistributedSampler: each rank its own batches
    loss = ddp(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"rank {rank} loss {loss.item():.3f}  trained layers {opt.active_layers}", flush=True)
# --8<-- [end:ddp]
selections = [None] * dist.get_world_size()
dist.all_gather_object(selections, (opt.active_layers, opt.scheduler.importance.tolist()))
if rank == 0:
    assert all(s == selections[0] for s in selections), selections
    print("every rank holds the same selection and importance:", selections[0][0])
dist.destroy_process_group()
