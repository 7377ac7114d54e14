"""A stock Hugging Face Trainer script, with Perforated Backpropagation added in 3 lines (# PB).

Fine-tunes a tiny random-config BERT (nothing is downloaded) on generated token sequences whose
label is the XOR of the tokens at positions 1 and 3 (no linear function of the tokens solves it),
with 10% of the labels flipped, so the loss cannot reach 0 and the schedule has a real plateau.

    python examples/hf_trainer.py [--epochs 100] [--out runs/hf_trainer]
"""
import argparse

import torch
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainingArguments,
                          default_data_collator)

import pbp_fx.integrations.hf  # PB

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=100)
ap.add_argument("--out", default="runs/hf_trainer")
cli = ap.parse_args()


def xor_dataset(n, seed, vocab=8, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    bits = torch.randint(0, 2, (n, 2), generator=g)
    ids[:, 1], ids[:, 3] = bits[:, 0], bits[:, 1]
    labels = (bits[:, 0] ^ bits[:, 1]) ^ (torch.rand(n, generator=g) < 0.1).long()
    mask = torch.ones(length, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


torch.manual_seed(0)
train, val = xor_dataset(1024, seed=0), xor_dataset(256, seed=1)
config = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=16, num_labels=2)
model = BertForSequenceClassification(config)
model = pbp_fx.perforate(model, example_kwargs=default_data_collator(train[:8]))  # PB
args = TrainingArguments(
    output_dir=cli.out, num_train_epochs=cli.epochs, learning_rate=3e-3, lr_scheduler_type="linear",
    per_device_train_batch_size=32, eval_strategy="epoch", save_strategy="no", logging_strategy="epoch",
    report_to=[], use_cpu=True, disable_tqdm=True)
trainer = Trainer(
    model=model, args=args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
    callbacks=[pbp_fx.integrations.hf.PBCallback(pbp_fx.PBConfig(patience=5, max_dendrite_epochs=10))],  # PB
)
trainer.train()
trainer.save_model()
result = trainer.evaluate()
print(f"epochs {trainer.state.epoch:.0f}, eval_loss {result['eval_loss']:.4f}, "
      f"eval_accuracy {result['eval_accuracy']:.4f}")
