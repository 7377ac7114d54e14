"""A tiny transformer encoder classifying MNIST-1D.

[B, 40] -> 10 tokens of 4 values -> Linear embed to d + learned positions
-> 2 pre-LayerNorm encoder blocks -> final LayerNorm -> mean over tokens
-> Linear to 10.  Attention is written out with Linear/matmul/softmax
(no nn.MultiheadAttention) so every projection is a plain nn.Linear.  Reshapes
use constant sizes from the constructor (batch as -1), so torch.fx.symbolic_trace
works and exported graphs carry no shape arithmetic.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # as part of the pbp_fx.models package
    from ._data import mnist1d_splits
except ImportError:  # loaded by file path (e.g. a copied template)
    from pbp_fx.models._data import mnist1d_splits

TASK = "classification"
loss_fn = F.cross_entropy


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, tokens: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.head_dim, self.tokens = dim, heads, dim // heads, tokens
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def _split_heads(self, x):
        # [B, T, C] -> [B, H, T, C/H]
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(x))
        v = self._split_heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
        attn = self.attn_drop(torch.softmax(scores, dim=-1))
        y = torch.matmul(attn, v).transpose(1, 2).reshape(-1, self.tokens, self.dim)  # [B, T, C]
        return self.out(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, tokens: int, mlp_ratio: int = 2, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, tokens, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TinyTransformer(nn.Module):
    def __init__(
        self,
        width: int = 32,
        heads: int = 4,
        depth: int = 2,
        tokens: int = 10,
        token_dim: int = 4,
        num_classes: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.embed = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(
            *(Block(width, heads, tokens, dropout=dropout) for _ in range(depth))
        )
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = x.reshape(-1, self.tokens, self.token_dim)  # [B, 40] -> [B, 10, 4]
        x = self.embed(x) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x.mean(dim=1))


def build_model(width: int = 32, **kw) -> nn.Module:
    return TinyTransformer(width=width, **kw)


def example_inputs() -> tuple:
    return (torch.randn(4, 40, generator=torch.Generator().manual_seed(0)),)


def datasets(seed: int = 0, num_samples: int | None = None):
    """(train, val, test): 3200 / 800 / 1000 samples of x [40] by default."""
    return mnist1d_splits(seed, num_samples or 5000)
