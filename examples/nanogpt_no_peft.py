"""A nanoGPT-style model without peft: the library's own bottleneck adapters, blocks named with layers=."""

import torch
from torch import nn

from ist_optim import ISTAdamW, add_adapters


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up_proj, self.down_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down_proj(torch.relu(self.up_proj(self.ln(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, n_layer: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.Sequential(*[Block(d) for _ in range(n_layer)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.h(self.wte(idx)))


def lm_loss(logits, idx):
    # probes call loss_fn(output, *forward_args): the model returns logits, not a .loss
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


torch.manual_seed(0)
model = GPT()
# --8<-- [start:adapters]
add_adapters(model, ["up_proj", "down_proj"], "parallel", bottleneck=16)  # beside each match; freezes the rest
opt = ISTAdamW(model, lr=2e-3, active_layers=0.25, layers=model.h, loss_fn=lm_loss, probe_interval=2)
# --8<-- [end:adapters]
for _ in range(6):
    idx = torch.randint(0, 256, (4, 16))
    loss = lm_loss(model(idx), idx)
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"loss {loss.item():.3f}  trained layers {opt.active_layers}")
