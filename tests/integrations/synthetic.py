"""Small synthetic tasks and models for the integration tests (generated, offline, no download)."""
import torch


def parity_tokens(n: int, seed: int, vocab: int = 8, length: int = 6) -> list[dict]:
    """Sequences of random tokens 2..vocab-1 with a 0/1 token at positions 1 and 3; label = their XOR.

    No linear function of the tokens separates XOR: a model must combine the two positions.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    bits = torch.randint(0, 2, (n, 2), generator=g)
    ids[:, 1], ids[:, 3] = bits[:, 0], bits[:, 1]
    labels = bits[:, 0] ^ bits[:, 1]
    mask = torch.ones(length, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def tiny_bert(num_labels: int = 2, seed: int = 0):
    """A random-config BERT for sequence classification (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=num_labels)
    return BertForSequenceClassification(config)
