"""Fine-tuning: train_edm2.py --init starts a run at a network pickle's function (its architecture and
weights, the reference's pickle format, float16 and not normalised), trains and resumes from its
checkpoint; options that would change the architecture and datasets that do not fit are refused."""

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train_edm2
from tests.conftest import assert_ok, assert_one_line_error
from tests.scripts import train_helpers
from tests.test_train_cli import dry_run_config, in_process_group_of_one
from torch_utils import persistence, weight_files
from training.encoders import StandardRGBEncoder
from training.networks_edm2 import Precond
from training.training_loop import EDM2Loss

NET_KWARGS = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
ARGS = ["--preset", "cpu-16", "--batch", "32", "--status", "512", "--snapshot", "1Ki", "--checkpoint", "1Ki"]
ARGS += ["--grid", "0", "--no-tensorboard", "--lr", "0.002"]


def reference_pickle(path, label_dim=4, seed=0):
    """A network pickle as the reference writes it: a dict with a float16 Precond and its init kwargs.
    The weights are scaled away from unit norm, and the gains set, so that the function is not trivial."""
    torch.manual_seed(seed)
    net = Precond(img_resolution=8, img_channels=3, label_dim=label_dim, **NET_KWARGS)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(
                torch.full_like(p, 0.7)
                if p.ndim == 0
                else p * (0.5 + 3 * torch.rand([p.shape[0]] + [1] * (p.ndim - 1)))
            )
    data = dnnlib.EasyDict(
        encoder=StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x", use_labels=True),
        loss_fn=EDM2Loss(),
        ema=net.eval().requires_grad_(False).to(torch.float16),
    )
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def outputs(net, seed=0):
    """D(x; sigma, class) of a network in float32 eval mode on fixed inputs over the range of noise levels."""
    net = net.float().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([8, 3, 8, 8], generator=g)
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 2.0, 5.0, 20.0, 80.0])
    labels = torch.eye(4)[torch.arange(8) % 4] if net.label_dim else None
    with torch.no_grad():
        return net(x * sigma.reshape(-1, 1, 1, 1), sigma, labels)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return dnnlib.EasyDict(
        pkl=reference_pickle(root / "ref.pkl"),
        data=train_helpers.random_dataset_zip(str(root / "rgb.zip"), num_images=32, resolution=8, num_classes=4),
        root=root,
    )


def invoke(*args):
    with in_process_group_of_one():
        return CliRunner().invoke(train_edm2.cmdline, [str(a) for a in args])


def test_init_takes_the_architecture_from_the_pickle(setup, tmp_path):
    c = dry_run_config(invoke("--outdir", tmp_path / "run", "--data", setup.data, "--init", setup.pkl, *ARGS, "-n"))
    assert c["init"] == setup.pkl
    use_fp16 = c["network_kwargs"].pop("use_fp16")  # this run's precision, as without --init
    assert c["network_kwargs"] == dict(class_name="training.networks_edm2.Precond", **NET_KWARGS)
    assert (
        use_fp16
        == dry_run_config(invoke("--outdir", tmp_path / "r", "--data", setup.data, "-n"))["network_kwargs"]["use_fp16"]
    )
    # --dropout adds no weights: it may change; the preset's own architecture keys are not used.
    c = dry_run_config(
        invoke("--outdir", tmp_path / "r", "--data", setup.data, "--init", setup.pkl, "--dropout", 0.1, "-n")
    )
    assert c["network_kwargs"]["dropout"] == 0.1 and c["network_kwargs"]["model_channels"] == 8
    # Without --init nothing changes: no "init" key at all.
    assert "init" not in dry_run_config(invoke("--outdir", tmp_path / "r", "--data", setup.data, *ARGS, "-n"))


def test_init_starts_at_the_pickles_function_trains_and_resumes(setup, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(invoke("--outdir", run_dir, "--data", setup.data, "--init", setup.pkl, *ARGS, "--duration", "1Ki"))
    with open(run_dir / "training_options.json") as f:
        assert json.load(f)["init"] == setup.pkl
    original = outputs(persistence.load_network_pickle(setup.pkl)["ema"])
    other = outputs(persistence.load_network_pickle(reference_pickle(tmp_path / "other.pkl", seed=1))["ema"])
    for std in ["0.050", "0.100"]:
        start = outputs(persistence.load_network_pickle(str(run_dir / f"network-snapshot-0000000-{std}.pkl"))["ema"])
        # Equal up to float16 storage of the (normalised) weights; a different network is far off.
        assert (start - original).abs().max() < 0.02 * original.abs().max()
        assert (other - original).abs().max() > 0.2 * original.abs().max()
    trained = outputs(persistence.load_network_pickle(str(run_dir / "network-snapshot-0000001-0.100.pkl"))["ema"])
    assert not torch.allclose(trained, original)  # it trained

    # Resuming continues from the checkpoint, not from the pickle: the checkpoint's weights differ.
    result = invoke("--outdir", run_dir, "--data", setup.data, "--init", setup.pkl, *ARGS, "--duration", "2Ki")
    assert_ok(result)
    assert "from 1 kimg to 2 kimg" in result.output
    resumed = torch.load(run_dir / "training-state-0000002.pt", map_location="cpu", weights_only=True)
    assert resumed["state"]["cur_nimg"] == 2048


def test_init_from_a_safetensors_file(setup, tmp_path):
    path = str(tmp_path / "ref.safetensors")
    weight_files.save_network(persistence.load_network_pickle(setup.pkl), path)
    run_dir = tmp_path / "run"
    assert_ok(invoke("--outdir", run_dir, "--data", setup.data, "--init", path, *ARGS, "--duration", "1Ki"))
    start = outputs(persistence.load_network_pickle(str(run_dir / "network-snapshot-0000000-0.100.pkl"))["ema"])
    original = outputs(persistence.load_network_pickle(setup.pkl)["ema"])
    assert (start - original).abs().max() < 0.02 * original.abs().max()


def test_library_entry_takes_init(setup, tmp_path):
    from training import training_loop

    with in_process_group_of_one():
        import torch_utils.distributed as dist

        dist.init()
        training_loop.training_loop(
            dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=setup.data, use_labels=True),
            encoder_kwargs=dict(class_name="training.encoders.StandardRGBEncoder"),
            data_loader_kwargs=dict(class_name="torch.utils.data.DataLoader", num_workers=0),
            network_kwargs=dict(class_name="training.networks_edm2.Precond", **NET_KWARGS),
            run_dir=str(tmp_path),
            batch_size=32,
            total_nimg=1024,
            status_nimg=None,
            snapshot_nimg=1024,
            checkpoint_nimg=None,
            init=setup.pkl,
        )
    start = outputs(persistence.load_network_pickle(str(tmp_path / "network-snapshot-0000000-0.050.pkl"))["ema"])
    original = outputs(persistence.load_network_pickle(setup.pkl)["ema"])
    assert (start - original).abs().max() < 0.02 * original.abs().max()


def test_architecture_options_and_mismatched_datasets_are_refused(setup, tmp_path):
    base = ["--outdir", tmp_path / "run", "--init", setup.pkl, "-n"]
    assert_one_line_error(invoke(*base, "--data", setup.data, "--channels", 16), "--channels", "--init")
    big = train_helpers.random_dataset_zip(str(tmp_path / "big.zip"), num_images=8, resolution=16, num_classes=4)
    assert_one_line_error(invoke(*base, "--data", big), "--init", "img_resolution 8 in the network, 16 in the dataset")
    five = train_helpers.random_dataset_zip(str(tmp_path / "five.zip"), num_images=10, resolution=8, num_classes=5)
    assert_one_line_error(invoke(*base, "--data", five), "label_dim 4 in the network, 5 in the dataset")
    assert_one_line_error(invoke(*base, "--data", setup.data, "--cond", "False"), "label_dim 4 in the network, 0")
    latents = train_helpers.latent_dataset_dir(str(tmp_path / "latents"), resolution=8)
    assert_one_line_error(invoke(*base, "--data", latents), "img_channels 3 in the network, 4 in the dataset")
    (tmp_path / "bad.pkl").write_bytes(np.random.RandomState(0).bytes(100))
    assert_one_line_error(
        invoke("--outdir", tmp_path / "run", "--init", tmp_path / "bad.pkl", "-n", "--data", setup.data), "--init"
    )
    assert not (tmp_path / "run").exists()
