"""Encoders: exact RGB round trip, and the VAE encoder on a tiny local AutoencoderKL."""

import io
import pickle

import numpy as np
import pytest
import torch

from tests.test_persistence import MetaRecorder
from torch_utils import persistence
from training import encoders


def test_standard_rgb_round_trips_every_pixel_value():
    enc = encoders.StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)
    latents = enc.encode(pixels)
    assert latents.dtype == torch.float32
    assert torch.allclose(latents, pixels.float() / 127.5 - 1)
    assert latents.min() == -1 and latents.max() == 1
    decoded = enc.decode(latents)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, pixels)
    # decode clips, and truncates toward zero after adding 128 (as the reference does).
    assert enc.decode(torch.tensor([-5.0, 5.0, 0.0, 0.01])).tolist() == [0, 255, 128, 129]


def make_tiny_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vae")
    return folder, make_tiny_vae(folder)


def test_stability_vae_encoder_on_tiny_local_vae(tiny_vae):
    folder, vae = tiny_vae
    enc = encoders.StabilityVAEEncoder(vae_name=str(folder), batch_size=3)
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, [5, 3, 16, 16], dtype=torch.uint8)
    with torch.no_grad():
        raw = enc.encode_pixels(pixels)
        assert raw.shape == (5, 8, 8, 8) and raw.dtype == torch.float32  # mean and std of 4 latent channels
        # The VAE must see pixels in [0, 1] (not [-1, 1]): compare with calling it directly.
        dist = vae.encode(pixels.float() / 255).latent_dist
        assert torch.allclose(raw[:, :4], dist.mean, atol=1e-5) and torch.allclose(raw[:, 4:], dist.std, atol=1e-5)
        assert not torch.allclose(raw[:, :4], vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean, atol=1e-3)

        # Final latents: a posterior draw, then the per-channel affine map of the encoder (EDM2 paper, Appendix).
        torch.manual_seed(2)
        final = enc.encode_latents(raw)
        torch.manual_seed(2)
        draw = raw[:, :4] + torch.randn_like(raw[:, :4]) * raw[:, 4:]
        scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        bias = -np.float32([5.81, 3.25, 0.12, -2.15]) * scale
        expected = draw * torch.from_numpy(scale).reshape(1, -1, 1, 1) + torch.from_numpy(bias).reshape(1, -1, 1, 1)
        assert torch.allclose(final, expected, atol=1e-6)

        decoded = enc.decode(final)
        assert decoded.dtype == torch.uint8 and decoded.shape == pixels.shape
        direct = vae.decode(draw).sample.clamp(0, 1).mul(255).to(torch.uint8)
        assert (decoded.int() - direct.int()).abs().max() <= 1


def test_stability_vae_encoder_pickles_without_the_vae(tiny_vae):
    folder, _ = tiny_vae
    enc = encoders.StabilityVAEEncoder(vae_name=str(folder))
    enc.init(torch.device("cpu"))
    assert enc._vae is not None
    data = pickle.dumps(enc)
    assert len(data) < 20000  # The VAE's weights are not in there.
    recorder = MetaRecorder(io.BytesIO(data))
    recorder.load()
    state = recorder.metas[0]["state"]
    assert state["_vae"] is None and state["vae_name"] == str(folder) and state["batch_size"] == 8
    assert enc._vae is not None  # Pickling does not unload it from the live object.
    for loaded in (pickle.loads(data), persistence.safe_load(io.BytesIO(data))):
        assert loaded._vae is None and np.array_equal(loaded.scale, enc.scale)
        with torch.no_grad():
            out = loaded.decode(torch.zeros(1, 4, 8, 8))
        assert out.shape == (1, 3, 16, 16)
