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
