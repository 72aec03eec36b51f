"""The gated MLP of a block, and of each expert: w2(act(w1 x) * w3 x) with SiLU (SwiGLU, Shazeer 2020)
or tanh GELU (GeGLU, Gemma)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up


class FeedForward(nn.Module):
    """The dense gated MLP of hidden width `width` (default cfg.ffn_dim; a shared expert's is its own)."""

    def __init__(self, cfg: ModelConfig, width: int = 0):
        super().__init__()
        width = width or cfg.ffn_dim
        self.w1 = nn.Linear(cfg.dim, width, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, width, bias=False)  # up
        self.w2 = nn.Linear(width, cfg.dim, bias=False)  # down
        # The parameter-free gate is reached through an attribute, which an engine may compile (trainer/engines/base.py).
        self.gelu, self.gate = cfg.activation == "gelu_tanh", gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.gate(self.w1(x), self.w3(x), self.gelu))
