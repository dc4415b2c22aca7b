"""Problems shared by the spec tests: seeded float64 gradients on odd-shaped tensors."""

from __future__ import annotations

import torch

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,)]


class NoisyQuadratic:
    """Per tensor: grad = a * (p - c) + sigma * noise_t, all float64 and seeded."""

    def __init__(self, seed: int, sigma: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.curvature = [torch.rand(s, generator=gen, dtype=torch.float64) * 1.5 + 0.5 for s in SHAPES]
        self.center = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        # float32-representable, so the float32 optimizer and the float64 loop start from the same x_0
        self.initial = [torch.randn(s, generator=gen, dtype=torch.float64).float().double() for s in SHAPES]
        self.noise_gen = torch.Generator().manual_seed(seed + 1000)
        self.sigma = sigma

    def grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            a * (p - c) + self.sigma * torch.randn(p.shape, generator=self.noise_gen, dtype=torch.float64)
            for a, c, p in zip(self.curvature, self.center, params)
        ]

    def float32_params(self) -> list[torch.Tensor]:
        """Fresh float32 leaf tensors holding x_0, for the optimizer under test."""
        return [x.float().clone().requires_grad_(True) for x in self.initial]


def set_grads(params: list[torch.Tensor], grads64: list[torch.Tensor]) -> None:
    """Hand the float64 gradients to the float32 optimizer's parameters."""
    for p, g in zip(params, grads64):
        p.grad = g.to(torch.float32)
