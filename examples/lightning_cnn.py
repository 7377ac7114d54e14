"""A stock Lightning script (MNIST-1D 1-D CNN), with Perforated Backpropagation added in 3 lines (# PB).

MNIST-1D is generated locally (nothing is downloaded).

    python examples/lightning_cnn.py [--epochs 200] [--samples 5000]
"""
import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pbp_fx.models import mnist1d_cnn
import pbp_fx.integrations.lightning  # PB

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=200)
ap.add_argument("--samples", type=int, default=5000)
cli = ap.parse_args()


class Classifier(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)]


L.seed_everything(0)
train, val, test = mnist1d_cnn.datasets(seed=0, num_samples=cli.samples)
model = mnist1d_cnn.build_model(width=8)
model = pbp_fx.perforate(model, mnist1d_cnn.example_inputs())  # PB
module = Classifier(model)
trainer = L.Trainer(
    max_epochs=cli.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False,
    callbacks=[pbp_fx.integrations.lightning.PBCallback(pbp_fx.PBConfig(patience=10, max_dendrites=2))],  # PB
)
trainer.fit(module, DataLoader(train, batch_size=100, shuffle=True), DataLoader(val, batch_size=1000))
result = trainer.validate(module, DataLoader(test, batch_size=1000), verbose=False)[0]
print(f"epochs {trainer.current_epoch}, test loss {result['val_loss']:.4f}, test accuracy {result['val_acc']:.4f}")
