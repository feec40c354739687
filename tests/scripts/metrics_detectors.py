"""Small real detectors for the metric tests (tests/test_metrics.py, tests/test_calculate_metrics_cli.py).

``PoolDetector`` averages each channel over a 2x2 grid of blocks (12 features). For blocks of a
power-of-two number of pixels its float32 features are exact, so float64 statistics do not depend
on how the images are batched or split across processes. ``ConvDetector`` is a seeded conv net.
``TinyInception`` is a persistent class with the call signature of the FID detector pickle,
``model(x, return_features=True)``; pickled, it carries this module's source like the real one.

Run as a script under torchrun (tests/test_calculate_metrics_cli.py): registers a
``PoolDetector`` for ``fid`` and runs ``calculate_metrics.py`` with the remaining arguments.
"""

import os
import sys

import torch

from torch_utils import persistence


class PoolDetector(torch.nn.Module):
    """Channel means over a 2x2 grid of image blocks: [N, 3, H, W] uint8 -> [N, 12] float32."""

    feature_dim = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32), 2).flatten(1)


class ConvDetector(torch.nn.Module):
    """A seeded conv -> ReLU -> mean pool -> linear feature extractor (16 features)."""

    feature_dim = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.linear = torch.nn.Linear(8, self.feature_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = x.to(torch.float32) / 127.5 - 1
        return self.linear(torch.relu(self.conv(x)).mean(dim=[2, 3]))


@persistence.persistent_class
class TinyInception(torch.nn.Module):
    """Stands in for the Inception pickle: features only when asked for them, like the real one."""

    def __init__(self, feature_dim: int = 6):
        super().__init__()
        self.proj = torch.nn.Linear(3, feature_dim)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features, "the FID detector must be called with return_features=True"
        return self.proj(x.to(torch.float32).mean(dim=[2, 3]) / 255)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import calculate_metrics

    calculate_metrics.register_detector("fid", PoolDetector())
    calculate_metrics.cmdline(sys.argv[1:])
