"""An ordinary PyTorch training loop with Perforated Backpropagation: the lines marked # PB (8 added, 1 removed).

    python examples/custom_loop.py [--epochs 300]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import pbp_fx  # PB
from pbp_fx.models import digits_mlp

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=300)
epochs = ap.parse_args().epochs

torch.manual_seed(0)
train, val, test = digits_mlp.datasets(seed=0)
train_loader = DataLoader(train, batch_size=100, shuffle=True)
val_loader, test_loader = DataLoader(val, batch_size=1000), DataLoader(test, batch_size=1000)


def accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    model.train()
    return correct / len(loader.dataset)


model = digits_mlp.build_model(width=8)
model = pbp_fx.perforate(model, digits_mlp.example_inputs())  # PB
ctl = pbp_fx.PhaseController(model, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3))  # PB
optimizer = ctl.optimizer  # PB, was: optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(epochs):
    for x, y in train_loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if ctl.step(accuracy(model, val_loader)) == "complete":  # PB
        break  # PB
else:  # PB: the epoch budget ran out first
    ctl.finish("epoch budget reached")  # PB: drops candidates, loads the best-validation model

print(f"epochs {epoch + 1}, dendrites per site {model.num_dendrites}, "
      f"val {accuracy(model, val_loader):.4f}, test {accuracy(model, test_loader):.4f}")
