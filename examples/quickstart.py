"""The README's quickstart, runnable: fit a small regression with FusedAutoDropSGD and print its stats.

python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import autolr_fused as alr


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = x @ torch.randn(20, 1) + 0.1 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))
    batches = list(zip(x.split(32), y.split(32)))
    optimizer = alr.FusedAutoDropSGD(
        model.parameters(), lr=0.01, steps_per_epoch=len(batches), threshold=5.0, max_threshold=20.0, drop_delay=2
    )
    for epoch in range(30):
        for xb, yb in batches:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
        if epoch % 5 == 4:
            s = optimizer.stats()
            print(
                f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  lr {s['lr']:.4g}  angle {s['angle']:6.2f} deg  "
                f"drops {s['drops']}  pending {s['drop_pending']}"
            )


if __name__ == "__main__":
    main()
