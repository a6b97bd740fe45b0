"""Full-layer (LISA-style) mode: no adapters, every weight of the selected blocks trains; outside them frozen."""

from _tiny import base_model, batches, parse_args

from ist_optim import ISTAdamW

args = parse_args(__doc__)
model = base_model(args.smollm2)
vocab = model.config.vocab_size

# --8<-- [start:full]
opt = ISTAdamW(model, lr=1e-4, active_layers=0.25, state_policy="offload", outside_layers="freeze")
# --8<-- [end:full]
for batch in batches(args.steps, vocab):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"loss {loss.item():.3f}  trained blocks {opt.active_layers}")
print(opt.memory_report())
