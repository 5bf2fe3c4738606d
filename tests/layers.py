"""A linear layer's test material: correlated activations with outlier input channels, a weight, and
the layer-output error a quantizer or pruner is judged by."""

from __future__ import annotations

import torch

OUTLIERS = [3, 17, 64, 100]


def outlier_inputs(n: int, seed: int, width: int = 128) -> torch.Tensor:
    """Correlated activations (a 16-dim latent plus noise) with a few x20 outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, width, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 16, generator=g) @ mix + 0.3 * torch.randn(n, width, generator=g)
    x[:, [c for c in OUTLIERS if c < width]] *= 20
    return x


def random_weight(out: int = 64, inp: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))
