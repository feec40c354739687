"""Latent datasets of any diffusers AutoencoderKL: `dataset_tool.py encode` measures the latent statistics
and stores them with the VAE in dataset.json; training builds its encoder from them, so that the final
latents are zero-mean with standard deviation 0.5 and every network pickle carries that encoder; decoding
with another VAE is refused. A tiny random VAE, saved into a folder, is used end to end on the CPU."""

import json
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate_images
import train_edm2
from tests.conftest import assert_ok, assert_one_line_error
from tests.scripts import train_helpers
from tests.test_generate_images import read_images
from tests.test_train_cli import dry_run_config, in_process_group_of_one
from torch_utils import persistence
from training.encoders import StabilityVAEEncoder


def save_tiny_vae(folder, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(str(folder))
    return vae.eval()


def smooth_images(num, resolution=16, seed=0):
    """Images with structure (blurred noise plus a per-image tint), so that latents differ in mean and spread."""
    rng = np.random.RandomState(seed)
    x = rng.rand(num, resolution // 4, resolution // 4, 3).repeat(4, axis=1).repeat(4, axis=2)
    x = 0.6 * x + 0.4 * rng.rand(num, 1, 1, 3)
    return (x * 255).round().astype(np.uint8)


def read_json(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("dataset.json"))


def read_latents(path):
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".npy"))
        return np.stack([np.load(z.open(n)) for n in names])


def encode(*args):
    return CliRunner().invoke(dataset_tool.cmdline, ["encode", *[str(a) for a in args]])


def decode(*args):
    return CliRunner().invoke(dataset_tool.cmdline, ["decode", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-data")
    vae = save_tiny_vae(root / "vae")
    images = smooth_images(32)
    pixels = train_helpers.write_dataset_zip(str(root / "pixels.zip"), images, np.arange(32) % 4)
    assert_ok(encode("--vae", root / "vae", "--source", pixels, "--dest", root / "latents.zip", "--batch", 5))
    return root, vae, images


def test_encode_stores_the_vae_and_the_statistics_of_posterior_draws(encoded):
    root, vae, images = encoded
    info = read_json(root / "latents.zip")["vae"]
    assert info["name"] == str(root / "vae") and info["latent_channels"] == 4 and info["stats_images"] == 32
    # Independently: many posterior draws per image from the diffusers VAE itself, their empirical statistics.
    torch.manual_seed(0)
    with torch.no_grad():
        dist = vae.encode(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255).latent_dist
        draws = torch.stack([dist.sample() for _ in range(64)]).double()
    mean, std = draws.mean(dim=(0, 1, 3, 4)).numpy(), draws.std(dim=(0, 1, 3, 4)).numpy()
    assert np.all(np.abs(np.array(info["raw_mean"]) - mean) < 0.02 * std)
    np.testing.assert_allclose(info["raw_std"], std, rtol=0.02)
    # The spread of the means alone is smaller: the statistics are not those of the posterior means.
    assert np.all(np.array(info["raw_std"]) > dist.mean.double().std(dim=(0, 2, 3)).numpy() * 1.001)


def test_stats_images_uses_a_subset(encoded, tmp_path):
    root, _, _ = encoded
    dest = tmp_path / "subset.zip"
    assert_ok(encode("--model-url", root / "vae", "--source", root / "pixels.zip", "--dest", dest, "--stats-images", 8))
    info, full = read_json(dest)["vae"], read_json(root / "latents.zip")["vae"]
    assert info["stats_images"] == 8 and info["raw_mean"] != full["raw_mean"]
    np.testing.assert_allclose(info["raw_std"], full["raw_std"], rtol=0.5)  # same scale, other images
    assert np.array_equal(read_latents(dest), read_latents(root / "latents.zip"))  # every image is encoded


def test_training_encoder_gives_zero_mean_and_std_one_half(encoded, tmp_path):
    root, _, _ = encoded
    data = str(root / "latents.zip")
    c = dry_run_config(CliRunner().invoke(train_edm2.cmdline, ["--outdir", tmp_path / "run", "--data", data, "-n"]))
    info = read_json(data)["vae"]
    assert c["encoder_kwargs"] == dict(
        class_name="training.encoders.StabilityVAEEncoder",
        vae_name=str(root / "vae"),
        raw_mean=info["raw_mean"],
        raw_std=info["raw_std"],
    )
    kwargs = {k: v for k, v in c["encoder_kwargs"].items() if k != "class_name"}
    torch.manual_seed(0)
    final = StabilityVAEEncoder(**kwargs).encode_latents(torch.as_tensor(read_latents(data))).double()
    assert final.shape[1] == 4
    assert final.mean(dim=(0, 2, 3)).abs().max() < 0.03
    assert (final.std(dim=(0, 2, 3)) - 0.5).abs().max() < 0.02


def test_datasets_without_statistics_keep_the_old_encoder(tmp_path):
    data = train_helpers.latent_dataset_dir(str(tmp_path / "latents"))
    dataset = train_edm2._open_dataset(dict(class_name="training.dataset.ImageFolderDataset", path=data))
    assert train_edm2.dataset_encoder_kwargs(dataset) == dict(class_name="training.encoders.StabilityVAEEncoder")
    rgb = train_helpers.random_dataset_zip(str(tmp_path / "rgb.zip"))
    dataset = train_edm2._open_dataset(dict(class_name="training.dataset.ImageFolderDataset", path=rgb))
    assert train_edm2.dataset_encoder_kwargs(dataset) == dict(class_name="training.encoders.StandardRGBEncoder")


def test_inconsistent_statistics_are_refused(tmp_path):
    data = train_helpers.latent_dataset_dir(str(tmp_path / "latents"))
    with open(f"{data}/dataset.json") as f:
        meta = json.load(f)
    meta["vae"] = dict(name="x", latent_channels=3, raw_mean=[0, 0, 0], raw_std=[1, 1, 1])
    with open(f"{data}/dataset.json", "w") as f:
        json.dump(meta, f)
    result = CliRunner().invoke(train_edm2.cmdline, ["--outdir", tmp_path / "run", "--data", data, "-n"])
    assert_one_line_error(result, "--data", "3 latent channels", "8 channels")


@pytest.mark.slow
def test_train_sample_and_decode_with_the_datasets_vae(encoded, tmp_path, single_process_cli):
    root, _, _ = encoded
    run_dir, data = tmp_path / "run", root / "latents.zip"
    args = ["--preset", "cpu-16", "--channels", "8", "--batch", "32", "--duration", "1Ki", "--status", "512"]
    args += ["--snapshot", "1Ki", "--checkpoint", "1Ki", "--grid", "0", "--no-tensorboard"]
    with in_process_group_of_one():
        result = CliRunner().invoke(train_edm2.cmdline, ["--outdir", run_dir, "--data", data, *args])
    assert_ok(result)
    snapshot = run_dir / "network-snapshot-0000001-0.100.pkl"
    encoder = persistence.load_network_pickle(str(snapshot))["encoder"]
    info = read_json(data)["vae"]
    assert isinstance(encoder, StabilityVAEEncoder) and encoder.vae_name == str(root / "vae")
    np.testing.assert_allclose(encoder.scale, 0.5 / np.float32(info["raw_std"]), rtol=1e-6)

    out = tmp_path / "images"
    assert_ok(single_process_cli(generate_images.cmdline, "--net", snapshot, "--outdir", out, "--seeds", "0-1"))
    images = read_images(out)
    assert [v.shape for v in images.values()] == [(16, 16, 3)] * 2  # 8x8x4 latents decoded by the tiny VAE

    assert_ok(decode("--source", data, "--dest", tmp_path / "decoded.zip", "--max-images", 2))
    assert_ok(decode("--vae", root / "vae", "--source", data, "--dest", tmp_path / "again.zip", "--max-images", 2))
    save_tiny_vae(tmp_path / "other", seed=1)
    line = assert_one_line_error(decode("--vae", tmp_path / "other", "--source", data, "--dest", tmp_path / "no.zip"))
    assert "differs from the VAE the dataset was encoded with" in line and str(root / "vae") in line
    assert not (tmp_path / "no.zip").exists()
