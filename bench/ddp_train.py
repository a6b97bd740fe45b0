"""Data-parallel IST: every rank trains the same layers with the same importance.

Trains a small config-built LLaMA with LoRA under DDP (default) or FSDP2
(``--fsdp2``), each rank on its own batches, then checks that the ranks agree
on the selection of every step, the importance and every adapter weight.
gloo on CPU, nccl on GPUs (one per rank); nothing else changes.

    torchrun --nproc_per_node 2 bench/ddp_train.py
    torchrun --nproc_per_node 2 bench/ddp_train.py --fsdp2 --steps 40
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import ISTAdamW


def build_model(layers: int, hidden: int, vocab: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would also broadcast rank 0's)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora).to(device)


def batch_for(step: int, rank: int, batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * rank + step)  # different data on every rank
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def all_equal(value: torch.Tensor) -> bool:
    """Whether ``value`` holds the same bits on every rank."""
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="per rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--fsdp2", action="store_true", help="fully_shard each block and the root instead of DDP")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    model = build_model(args.layers, args.hidden, args.vocab, device)
    if args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        train_model = model
    else:
        # find_unused_parameters=True: the layers not selected in a step get no gradient.
        train_model = DDP(model, find_unused_parameters=True)
    # check_consistency=True compares a hash of selection and importance across ranks after every step
    # (or set IST_CHECK_CONSISTENCY=1); it raises if the ranks ever disagree.
    opt = ISTAdamW(train_model, lr=2e-3, active_layers=0.25, probe_interval=5, check_consistency=True)

    selections = []
    start = time.perf_counter()
    for step in range(args.steps):
        selections.append(opt.active_layers)
        loss = train_model(**batch_for(step, rank, args.batch, args.seq, args.vocab, device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  layers {selections[-1]}", flush=True)
    seconds = time.perf_counter() - start

    def full(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors

    weights = torch.cat([full(p.detach()).reshape(-1).float() for n, p in model.named_parameters() if "lora_" in n])
    checks = {
        "selections": all_equal(torch.tensor(selections, device=device)),
        "importance": all_equal(opt.scheduler.importance.to(device)),
        "adapter weights": all_equal(weights),
    }
    if rank == 0:
        engine = "FSDP2" if args.fsdp2 else "DDP"
        distinct = len({tuple(s) for s in selections})
        print(
            f"{engine}, {world} ranks ({dist.get_backend()}), {args.steps} steps in {seconds:.1f} s, "
            f"{opt.scheduler.num_updates} importance updates, {distinct} distinct selections"
        )
        print("importance", [round(x, 3) for x in opt.scheduler.importance.tolist()])
        print("memory", opt.memory_report())
        for what, same in checks.items():
            print(f"ranks agree on {what}: {same}")
    del opt, train_model  # DDP's reducer must go before its process group
    dist.destroy_process_group()
    if not all(checks.values()):
        raise SystemExit("ranks disagree")


if __name__ == "__main__":
    main()
