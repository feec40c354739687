"""Converters between pixels and the space the diffusion model works in (EDM2 paper, Appendix).

Pixels are NCHW uint8 RGB. ``encode_pixels`` maps them to the *raw* latents stored in a dataset,
``encode_latents`` maps raw latents to the *final* latents the network sees, and ``decode`` maps
final latents back to uint8 pixels. The module is embedded in network pickles, so it imports only
numpy, torch, dnnlib and torch_utils; diffusers is imported lazily when a VAE is first needed.
"""

import os
import warnings

import numpy as np
import torch

from torch_utils import misc, persistence


@persistence.persistent_class
class Encoder:
    """Abstract base class: pixels <-> raw latents <-> final latents."""

    def init(self, device):  # Force lazy set-up (e.g. loading a VAE) to happen now.
        pass

    def __getstate__(self):
        return self.__dict__

    def encode(self, x):  # pixels -> final latents
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):  # pixels -> raw latents
        raise NotImplementedError

    def encode_latents(self, x):  # raw latents -> final latents
        raise NotImplementedError

    def decode(self, x):  # final latents -> pixels
        raise NotImplementedError


@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixel-space models: the raw latents are the pixels, the final latents are pixels in [-1, 1]."""

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        # +128 rather than +127.5: the uint8 cast truncates toward zero, so this rounds to nearest.
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Latent-space models: Stable Diffusion's VAE, with per-channel normalisation of its latents.

    Raw latents are the VAE posterior's mean and standard deviation (8 channels). Final latents are a
    draw from that posterior, shifted and scaled so that each channel has ``final_mean`` and
    ``final_std`` over the data set (``raw_mean`` / ``raw_std`` are the ImageNet-512 statistics).
    """

    def __init__(
        self,
        vae_name="stabilityai/sd-vae-ft-mse",  # Hub name or local folder of an AutoencoderKL.
        raw_mean=[5.81, 3.25, 0.12, -2.15],  # Mean of the raw latents, per channel.
        raw_std=[4.17, 4.62, 3.71, 3.28],  # Standard deviation of the raw latents, per channel.
        final_mean=0,  # Wanted mean of the final latents.
        final_std=0.5,  # Wanted standard deviation of the final latents.
        batch_size=8,  # Images per VAE call.
    ):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device):
        super().init(device)
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self):
        return dict(super().__getstate__(), _vae=None)  # The VAE is never pickled.

    def _run_vae_encoder(self, x):
        d = self._vae.encode(x)["latent_dist"]
        return torch.cat([d.mean, d.std], dim=1)

    def _run_vae_decoder(self, x):
        return self._vae.decode(x)["sample"]

    def encode_pixels(self, x):
        self.init(x.device)
        x = x.to(torch.float32) / 255  # The VAE sees [0, 1]; the published latent statistics depend on it.
        return torch.cat([self._run_vae_encoder(batch) for batch in x.split(self.batch_size)])

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        x = x * misc.const_like(x, self.scale.reshape(1, -1, 1, 1))
        x = x + misc.const_like(x, self.bias.reshape(1, -1, 1, 1))
        return x

    def decode(self, x):
        self.init(x.device)
        x = x.to(torch.float32)
        x = x - misc.const_like(x, self.bias.reshape(1, -1, 1, 1))
        x = x / misc.const_like(x, self.scale.reshape(1, -1, 1, 1))
        x = torch.cat([self._run_vae_decoder(batch) for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)


def load_stability_vae(vae_name="stabilityai/sd-vae-ft-mse", device=torch.device("cpu")):
    """Load a diffusers AutoencoderKL by hub name or local folder, local files first, hub downloads cached."""
    import dnnlib

    cache_dir = dnnlib.make_cache_dir_path("diffusers")
    os.environ.setdefault("HF_HUB_DISABLE_SYMLINKS_WARNING", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers  # Lazy: only VAE users need it, and it is slow to import.

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, local_files_only=True)
        except (OSError, ValueError):
            vae = diffusers.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir)
    return vae.eval().requires_grad_(False).to(device)
