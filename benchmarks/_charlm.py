"""The character-level transformer language model of the benchmarks, on text that ships with Python
(``pydoc_data.topics``, the help texts of the interpreter)."""

from __future__ import annotations

import torch
from torch import nn

try:
    import lightning.pytorch as L
except ImportError:  # pragma: no cover
    import pytorch_lightning as L


def char_data(seq: int = 64) -> tuple[torch.Tensor, int]:
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values())
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:400_000]], dtype=torch.long)
    n = (len(ids) - 1) // seq
    return ids[: n * seq + 1], len(chars)


def char_splits(seq: int = 32) -> tuple[int, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The vocabulary size, the training (inputs, next characters) and 256 held-out sequences
    from the last tenth of the text."""
    ids, vocab = char_data(seq)
    n = (len(ids) - 1) // seq
    x, y = ids[:-1].view(n, seq), ids[1:].view(n, seq)
    held = n // 10
    return vocab, (x[:-held], y[:-held]), (x[-held:][:256], y[-held:][:256])


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.ln1(h)
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(att.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class CharLM(L.LightningModule):
    def __init__(self, vocab: int, d: int = 128, layers: int = 2, heads: int = 4, seq: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
