"""Helpers for the training tests and benchmarks: small datasets in the dataset layout of `dataset_tool.py`, a loss
without random draws, and a tiny Heun sampler for looking at what a run learned."""

import io
import json
import os
import zipfile
from typing import Optional

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------
# Datasets.


def write_dataset_zip(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None) -> str:
    """Write NHWC uint8 ``images`` as an uncompressed ZIP of PNGs (``00000/img00000000.png``) with
    ``dataset.json`` holding integer ``labels`` (or ``null``), as ``dataset_tool.py convert`` does."""
    assert images.dtype == np.uint8 and images.ndim == 4
    entries = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for idx, img in enumerate(images):
            name = f"{idx // 1000:05d}/img{idx:08d}.png"
            buf = io.BytesIO()
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="png", compress_level=0)
            zf.writestr(name, buf.getvalue())
            if labels is not None:
                entries.append([name, int(labels[idx])])
        zf.writestr("dataset.json", json.dumps({"labels": entries if labels is not None else None}))
    return path


def random_dataset_zip(
    path: str,
    num_images: int = 64,
    resolution: int = 8,
    channels: int = 3,
    num_classes: Optional[int] = 4,
    seed: int = 0,
) -> str:
    """A ZIP of random images (labels ``idx % num_classes``, or none)."""
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=[num_images, resolution, resolution, channels]).astype(np.uint8)
    labels = np.arange(num_images) % num_classes if num_classes else None
    return write_dataset_zip(path, images, labels)


def latent_dataset_dir(path: str, num_images: int = 8, resolution: int = 8, num_classes: int = 4, seed: int = 0) -> str:
    """A folder of float32 8-channel NPY "VAE latents" (mean and std), as ``dataset_tool.py encode`` writes."""
    rng = np.random.RandomState(seed)
    entries = []
    for idx in range(num_images):
        name = f"{idx // 1000:05d}/img-mean-std-{idx:08d}.npy"
        os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
        mean = rng.randn(4, resolution, resolution) * 4
        std = np.abs(rng.randn(4, resolution, resolution)) * 0.1
        np.save(os.path.join(path, name), np.concatenate([mean, std]).astype(np.float32))
        entries.append([name, idx % num_classes])
    with open(os.path.join(path, "dataset.json"), "w") as f:
        json.dump({"labels": entries}, f)
    return path


def digits_dataset_zip(path: str, resolution: int = 16) -> str:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, labels 0-9) as a dataset ZIP at
    ``resolution``, made the way a user would: PNGs in one folder per class, then
    ``dataset_tool.py convert`` (Lanczos resize, RGB)."""
    import tempfile

    from sklearn.datasets import load_digits

    import dataset_tool

    digits = load_digits()
    with tempfile.TemporaryDirectory() as source:
        for idx, (img, label) in enumerate(zip(digits.images, digits.target)):
            os.makedirs(os.path.join(source, str(label)), exist_ok=True)
            Image.fromarray(np.uint8(np.clip(img / 16 * 255, 0, 255))).save(
                os.path.join(source, str(label), f"{idx:04d}.png")
            )
        dataset_tool.convert_dataset(source=source, dest=path, resolution=(resolution, resolution))
    return path


# ----------------------------------------------------------------------------
# A loss without random draws, for checking the distributed and accumulation mechanics.


class DeterministicLoss:
    """The EDM2 loss with every random draw replaced by a fixed function of the image: sigma from
    the image's mean value, the noise a fixed pattern. Per-sample losses then depend only on which
    images are in the batch, not on the random state of the process that evaluates them."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        n = images.shape[0]
        sigma = (images.reshape(n, -1).mean(dim=1) * 2).exp().reshape(n, 1, 1, 1)
        grid = torch.arange(images[0].numel(), dtype=torch.float32, device=images.device).reshape(images.shape[1:])
        noise = torch.sin(grid * 12.9898 + images * 78.233) * sigma
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar


# ----------------------------------------------------------------------------
# Sampling: a deterministic Heun sampler (EDM time steps), independent of generate_images.py.


@torch.no_grad()
def heun_sample(
    net,
    labels: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    seed: int = 0,
) -> torch.Tensor:
    """Generate one image per row of ``labels``; returns float32 NCHW in the model's space."""
    gen = torch.Generator().manual_seed(seed)
    shape = [labels.shape[0], net.img_channels, net.img_resolution, net.img_resolution]
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = x * t[0]

    def denoise(x, sigma):
        return net(x.float(), sigma.float().reshape(1), labels).double()

    for k in range(num_steps):
        d = (x - denoise(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < num_steps - 1:
            d2 = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (d + d2) / 2
        x = x_next
    return x.float()


def save_grid(images_uint8: np.ndarray, path: str, cols: int, scale: int = 4) -> str:
    """Save NCHW uint8 images as one PNG grid (nearest-neighbour enlarged by ``scale``)."""
    n, c, h, w = images_uint8.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for idx, img in enumerate(images_uint8):
        r, q = divmod(idx, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img.transpose(1, 2, 0)
    pil = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.save(path)
    return path
