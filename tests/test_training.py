"""Tests of training/training_loop.py: the loss and learning-rate schedule against their equations,
exact resumption (slice_nimg, SIGKILL after a checkpoint), crash safety of snapshot and checkpoint
writes, the distributed and gradient-accumulation mechanics, and that a small model learns digits."""

import copy
import inspect
import json
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, assert_torchrun_succeeded, subprocess_env
from tests.scripts import train_helpers
from torch_utils import persistence
from training import training_loop as tl

TINY_NET = dict(
    class_name="training.networks_edm2.Precond",
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    logvar_channels=8,
)
RGB_ENCODER = dict(class_name="training.encoders.StandardRGBEncoder")


def tiny_kwargs(run_dir, data, **overrides) -> dict:
    """training_loop kwargs for a ~40k-parameter model on 8x8 images (loader in the main process)."""
    kwargs = dict(
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=str(data), use_labels=True),
        encoder_kwargs=RGB_ENCODER,
        data_loader_kwargs=dict(class_name="torch.utils.data.DataLoader", num_workers=0),
        network_kwargs=dict(TINY_NET, dropout=0.1),  # dropout: its masks must be reseeded on resume too
        loss_kwargs=dict(class_name="training.training_loop.EDM2Loss", P_mean=-0.8, P_std=1.6),
        lr_kwargs=dict(
            func_name="training.training_loop.learning_rate_schedule", ref_lr=0.01, ref_batches=16, rampup_Mimg=0.0005
        ),
        run_dir=str(run_dir),
        seed=3,
        batch_size=64,
        total_nimg=2048,
        status_nimg=512,
        snapshot_nimg=1024,
        checkpoint_nimg=1024,
    )
    kwargs.update(overrides)
    return kwargs


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a, b, where="checkpoint"):
    """Recursively compare checkpoint contents: tensors bitwise, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for idx, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{idx}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["state"]["cur_nimg"] == b["state"]["cur_nimg"]
    for key in ["net", "optimizer", "ema", "loss_fn"]:
        assert_bitwise_equal(a[key], b[key], key)


def snapshot_tensors(path) -> list:
    with open(path, "rb") as f:
        data = pickle.load(f)
    return [t.clone() for t in list(data["ema"].parameters()) + list(data["ema"].buffers())]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def tiny_data(workdir):
    return train_helpers.random_dataset_zip(str(workdir / "tiny.zip"), num_images=48, resolution=8, num_classes=4)


@pytest.fixture(scope="module")
def reference_run(workdir, tiny_data):
    """The tiny configuration trained to 2048 images in one go."""
    run_dir = workdir / "reference"
    tl.training_loop(**tiny_kwargs(run_dir, tiny_data))
    return run_dir


@pytest.fixture(scope="module")
def sliced_run(workdir, tiny_data):
    """The same configuration stopped by slice_nimg at its 1024-image checkpoint (tests copy it)."""
    run_dir = workdir / "sliced"
    tl.training_loop(**tiny_kwargs(run_dir, tiny_data, slice_nimg=1536))  # rounds down to the checkpoint interval
    return run_dir


# ----------------------------------------------------------------------------
# Loss and learning rate.


class _KnownNet(torch.nn.Module):
    """D(x; sigma) = 0.5 x + sigma and u(sigma) = log(sigma) / 2 + 0.1: known outputs for checking the loss."""

    def forward(self, x, sigma, labels=None, return_logvar=False):
        assert return_logvar
        sigma = sigma.reshape(-1, 1, 1, 1)
        return 0.5 * x + sigma, (sigma.log() / 2 + 0.1).expand(-1, 1, 1, 1)


def test_edm2_loss_matches_equation():
    loss_fn = tl.EDM2Loss(P_mean=-0.7, P_std=1.3, sigma_data=0.6)
    y = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)

    torch.manual_seed(123)
    loss = loss_fn(net=_KnownNet(), images=y, labels=None)

    # The same draws, in the documented order: sigma normals [N,1,1,1], then epsilon.
    torch.manual_seed(123)
    n = torch.randn([2, 1, 1, 1]).double()
    eps = torch.randn_like(y).double()
    sigma = torch.exp(-0.7 + 1.3 * n)
    lam = (sigma**2 + 0.36) / (sigma * 0.6) ** 2
    D = 0.5 * (y.double() + sigma * eps) + sigma
    u = sigma.log() / 2 + 0.1
    expected = lam / u.exp() * (D - y.double()) ** 2 + u
    assert loss.shape == y.shape
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_edm2_loss_is_persistent_with_exact_state():
    loss_fn = tl.EDM2Loss(P_mean=-0.8, P_std=1.6)
    assert persistence.is_persistent(loss_fn)
    assert set(loss_fn.__dict__) == {"P_mean", "P_std", "sigma_data", "_init_args", "_init_kwargs"}
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-0.8, 1.6, 0.5)
    clone = pickle.loads(pickle.dumps(loss_fn))
    assert (clone.P_mean, clone.P_std, clone.sigma_data) == (-0.8, 1.6, 0.5)


@pytest.mark.parametrize(
    "cur_nimg,batch_size,ref_lr,ref_batches,rampup_Mimg,expected",
    [
        (0, 2048, 0.01, 70000, 10, 0.0),  # the first step runs with lr 0
        (5_000_000, 2048, 0.01, 70000, 10, 0.01 * 0.5),  # half-way up the ramp, before the decay
        (70000 * 2048, 2048, 0.01, 70000, 10, 0.01),  # t = t_ref: decay just starting
        (4 * 70000 * 2048, 2048, 0.01, 70000, 10, 0.01 / 2),  # t = 4 t_ref: 1/sqrt(4)
        (9 * 35000 * 512, 512, 0.012, 35000, 10, 0.012 / 3),
        (100 * 64, 64, 0.01, 0, 10, 0.01 * 6400 / 10e6),  # ref_batches 0: no decay
        (50 * 64, 64, 0.01, 10, 0, 0.01 / math.sqrt(5)),  # rampup 0: no ramp-up
    ],
)
def test_learning_rate_schedule(cur_nimg, batch_size, ref_lr, ref_batches, rampup_Mimg, expected):
    lr = tl.learning_rate_schedule(
        cur_nimg=cur_nimg, batch_size=batch_size, ref_lr=ref_lr, ref_batches=ref_batches, rampup_Mimg=rampup_Mimg
    )
    assert lr == pytest.approx(expected, rel=1e-12, abs=0)


def test_check_training_config_rejects_bad_layouts():
    assert tl.check_training_config(batch_size=64, world_size=2, batch_gpu=8) == (8, 4)
    assert tl.check_training_config(batch_size=64, world_size=2, batch_gpu=100) == (32, 1)  # clamped
    for kwargs in [
        dict(batch_size=64, world_size=3),
        dict(batch_size=64, world_size=2, batch_gpu=12),
        dict(batch_size=64, total_nimg=1000),
        dict(batch_size=64, status_nimg=96),
        dict(batch_size=64, snapshot_nimg=640),
        dict(batch_size=64, checkpoint_nimg=64 * 24),
    ]:
        with pytest.raises(ValueError):
            tl.check_training_config(**kwargs)


def test_training_on_vae_latents(tmp_path):
    """8-channel datasets train in the VAE's latent space (encode_latents needs no VAE) and the
    snapshot carries the StabilityVAEEncoder without its VAE."""
    data = train_helpers.latent_dataset_dir(str(tmp_path / "latents"), num_images=8)
    run_dir = tmp_path / "run"
    tl.training_loop(
        **tiny_kwargs(
            run_dir,
            data,
            encoder_kwargs=dict(class_name="training.encoders.StabilityVAEEncoder"),
            batch_size=8,
            total_nimg=16,
            status_nimg=8,
            checkpoint_nimg=1024,
        )
    )
    with open(run_dir / "network-snapshot-0000000-0.050.pkl", "rb") as f:
        snapshot = pickle.load(f)
    assert type(snapshot.encoder).__name__ == "StabilityVAEEncoder" and snapshot.encoder._vae is None
    assert snapshot.ema.img_channels == 4 and snapshot.ema.img_resolution == 8
    assert load_checkpoint(run_dir / "training-state-0000000.pt")["state"]["cur_nimg"] == 16


def test_reference_signature_and_defaults(tmp_path):
    """training_loop keeps the reference's keywords and defaults; called as the reference allows
    (keywords only, defaults elsewhere: the VAE encoder, a DataLoader with 2 workers, Adam, PH-EMA)."""
    params = inspect.signature(tl.training_loop).parameters
    reference = dict(
        run_dir=".",
        seed=0,
        batch_size=2048,
        batch_gpu=None,
        total_nimg=8 << 30,
        slice_nimg=None,
        status_nimg=128 << 10,
        snapshot_nimg=8 << 20,
        checkpoint_nimg=128 << 20,
        loss_scaling=1,
        force_finite=True,
        cudnn_benchmark=True,
    )
    assert {name: params[name].default for name in reference} == reference
    assert params["encoder_kwargs"].default == dict(class_name="training.encoders.StabilityVAEEncoder")
    assert params["data_loader_kwargs"].default == dict(
        class_name="torch.utils.data.DataLoader", pin_memory=True, num_workers=2, prefetch_factor=2
    )
    data = train_helpers.latent_dataset_dir(str(tmp_path / "latents"), num_images=8)
    run_dir = tmp_path / "run"
    tl.training_loop(
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data),
        network_kwargs=TINY_NET,
        run_dir=str(run_dir),
        batch_size=8,
        total_nimg=16,
        status_nimg=8,
        snapshot_nimg=1024,
    )
    assert sorted(os.listdir(run_dir)) == [
        "network-snapshot-0000000-0.050.pkl",
        "network-snapshot-0000000-0.100.pkl",
        "stats.jsonl",
        "training-state-0000000.pt",
    ]
    ckpt = load_checkpoint(run_dir / "training-state-0000000.pt")
    assert ckpt["state"]["cur_nimg"] == 16 and ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_kwargs_defaults_are_the_reference_dicts_and_stay_unchanged():
    params = inspect.signature(tl.training_loop).parameters
    assert {name: params[name].default for name in tl.DEFAULT_KWARGS} == dict(
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=None),
        encoder_kwargs=dict(class_name="training.encoders.StabilityVAEEncoder"),
        data_loader_kwargs=dict(
            class_name="torch.utils.data.DataLoader", pin_memory=True, num_workers=2, prefetch_factor=2
        ),
        network_kwargs=dict(class_name="training.networks_edm2.Precond"),
        loss_kwargs=dict(class_name="training.training_loop.EDM2Loss"),
        optimizer_kwargs=dict(class_name="torch.optim.Adam", betas=(0.9, 0.99)),
        lr_kwargs=dict(func_name="training.training_loop.learning_rate_schedule"),
        ema_kwargs=dict(class_name="training.phema.PowerFunctionEMA"),
    )
    kwargs = tl._copy_or_default(None, "data_loader_kwargs")  # None = the default, as a copy
    kwargs["pin_memory"] = False
    assert params["data_loader_kwargs"].default["pin_memory"] is True
    assert tl._copy_or_default(False, "ema_kwargs") is False  # False = no EMA stays False


def test_forced_weight_normalisation_without_a_forward_pass_equals_the_training_forward():
    from training import networks_edm2 as N

    torch.manual_seed(0)
    net = N.Precond(
        img_resolution=8, img_channels=3, label_dim=4, **{k: v for k, v in TINY_NET.items() if k != "class_name"}
    )
    forced, passed = copy.deepcopy(net).train(), copy.deepcopy(net).train()
    passed.unet.enc.eval()  # layers in eval mode are left alone by both
    forced.unet.enc.eval()
    layers = forced.force_normalize_weights_()
    with torch.no_grad():
        passed(torch.randn([2, 3, 8, 8]), torch.ones([2]), torch.eye(4)[:2], return_logvar=True)
    convs = [m for m in forced.modules() if isinstance(m, N.MPConv)]
    assert layers == [m for m in convs if m.training] and 0 < len(layers) < len(convs)
    for (name, a), b in zip(forced.named_parameters(), passed.parameters()):
        assert torch.equal(a, b), name  # bitwise: the same rescaling
    moved = [not torch.equal(a, c) for a, c in zip(forced.parameters(), net.parameters())]
    assert sum(moved) == len(layers)  # exactly the weights of the normalised layers changed


class LossThatDiverges:
    """EDM2's loss for the first ``finite_calls`` calls, then NaN everywhere (a diverged run)."""

    def __init__(self, finite_calls):
        self.finite_calls, self.calls, self.loss = finite_calls, 0, tl.EDM2Loss()

    def __call__(self, net, images, labels=None):
        self.calls += 1
        loss = self.loss(net=net, images=images, labels=labels)
        return loss if self.calls <= self.finite_calls else loss * float("nan")


def test_diverged_tick_reports_nan(tmp_path, tiny_data):
    """A tick in which every loss is NaN reports NaN in stats.jsonl, not the previous tick's value."""
    run_dir = tmp_path / "run"
    tl.training_loop(
        **tiny_kwargs(
            run_dir,
            tiny_data,
            loss_kwargs=dict(class_name="tests.test_training.LossThatDiverges", finite_calls=2),
            total_nimg=256,
            status_nimg=128,
            snapshot_nimg=None,
            checkpoint_nimg=None,
        )
    )
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["Progress/kimg"] for s in stats] == [0.0, 0.128, 0.256]
    assert np.isfinite(stats[1]["Loss/loss"]) and np.isnan(stats[2]["Loss/loss"])
    assert stats[2]["Loss/learning_rate"] > 0  # the other statistics go on


# ----------------------------------------------------------------------------
# Exact resume.


@pytest.mark.slow
def test_reference_run_learning_rate_and_files(reference_run):
    """The run of the module fixture: files of every tick, and lr from the image count before each step."""
    names = sorted(os.listdir(reference_run))
    assert names == [
        "network-snapshot-0000000-0.050.pkl",
        "network-snapshot-0000000-0.100.pkl",
        "network-snapshot-0000001-0.050.pkl",
        "network-snapshot-0000001-0.100.pkl",
        "network-snapshot-0000002-0.050.pkl",
        "network-snapshot-0000002-0.100.pkl",
        "stats.jsonl",
        "training-state-0000001.pt",
        "training-state-0000002.pt",
    ]
    ckpt = load_checkpoint(reference_run / "training-state-0000002.pt")
    assert ckpt["state"]["cur_nimg"] == 2048
    # Mean lr over the steps of the tick ending at 512 images: steps start at 0, 64, ..., 448.
    stats = [json.loads(line) for line in (reference_run / "stats.jsonl").read_text().splitlines()]
    expected = np.mean([tl.learning_rate_schedule(n, 64, 0.01, 16, 0.0005) for n in range(0, 512, 64)])
    assert stats[1]["Progress/kimg"] == 0.512
    assert stats[1]["Loss/learning_rate"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_resume_by_slice_is_bitwise_exact(tmp_path, tiny_data, reference_run, sliced_run, capsys):
    assert sorted(p.name for p in sliced_run.glob("training-state-*.pt")) == ["training-state-0000001.pt"]
    assert not (sliced_run / "network-snapshot-0000002-0.050.pkl").exists()
    run_dir = tmp_path / "run"
    shutil.copytree(sliced_run, run_dir)
    capsys.readouterr()
    tl.training_loop(**tiny_kwargs(run_dir, tiny_data, slice_nimg=1536))
    assert "training-state-0000001.pt" in capsys.readouterr().out  # it resumed
    assert_same_training_state(reference_run / "training-state-0000002.pt", run_dir / "training-state-0000002.pt")
    for suffix in ["-0.050", "-0.100"]:
        name = f"network-snapshot-0000002{suffix}.pkl"
        for a, b in zip(snapshot_tensors(reference_run / name), snapshot_tensors(run_dir / name)):
            assert torch.equal(a, b)
    # A resumed run writes no status line, stats line or snapshot at its starting count.
    kimgs = [json.loads(line)["Progress/kimg"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert kimgs == [0.0, 0.512, 1.024, 1.536, 2.048]


# SIGKILL tests: the run goes on in a forked child (no interpreter start-up), which a hook stops at
# a chosen point by writing a marker file and sleeping; the test then kills it with SIGKILL.


def _child_main(kwargs, hook, target, marker):
    import traceback

    try:
        _child_main2(kwargs, hook, target, marker)
    except BaseException:
        Path(marker + ".err").write_text(traceback.format_exc())
        raise


def _child_main2(kwargs, hook, target, marker):
    import torch_utils.distributed as dist_mod

    def block():
        Path(marker).write_text("blocked")
        time.sleep(3600)

    current = {}
    orig_save = dist_mod.CheckpointIO.save

    def save(self, pt_path, *args, **kw):
        current["path"] = pt_path
        orig_save(self, pt_path, *args, **kw)
        if hook == "after_checkpoint" and os.path.basename(pt_path) == target:
            block()

    dist_mod.CheckpointIO.save = save

    if hook == "during_checkpoint":
        orig_torch_save = torch.save

        def torch_save(obj, f, *args, **kw):
            if os.path.basename(current.get("path", "")) != target:
                return orig_torch_save(obj, f, *args, **kw)
            import io

            buf = io.BytesIO()
            orig_torch_save(obj, buf, *args, **kw)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            block()

        torch.save = torch_save

    if hook == "during_snapshot":
        orig_dump = pickle.dump

        def dump(obj, f, *args, **kw):
            if target not in os.path.basename(str(getattr(f, "name", ""))):  # the temporary file of target
                return orig_dump(obj, f, *args, **kw)
            data = pickle.dumps(obj, *args, **kw)
            f.write(data[: len(data) // 2])
            f.flush()
            block()

        pickle.dump = dump

    tl.training_loop(**kwargs)
    os._exit(3)  # reaching the end means the hook never fired


def run_until_hook_then_kill(kwargs, hook, target, tmp_path):
    marker = tmp_path / f"marker-{hook}"
    if marker.exists():
        marker.unlink()
    proc = multiprocessing.get_context("fork").Process(target=_child_main, args=(kwargs, hook, target, str(marker)))
    proc.start()
    deadline = time.time() + 300
    while not marker.exists():
        err = Path(str(marker) + ".err")
        assert proc.is_alive(), (
            f"the training process ended (exit code {proc.exitcode}) before the {hook} hook fired"
            + (":\n" + err.read_text() if err.exists() else "")
        )
        assert time.time() < deadline, "timed out waiting for the hook"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, tiny_data, reference_run, capsys):
    run_dir = tmp_path / "run"
    kwargs = tiny_kwargs(run_dir, tiny_data)
    run_until_hook_then_kill(kwargs, "after_checkpoint", "training-state-0000001.pt", tmp_path)
    assert sorted(p.name for p in run_dir.glob("training-state-*")) == ["training-state-0000001.pt"]
    capsys.readouterr()
    tl.training_loop(**kwargs)  # the same command again
    assert "training-state-0000001.pt" in capsys.readouterr().out
    assert_same_training_state(reference_run / "training-state-0000002.pt", run_dir / "training-state-0000002.pt")


@pytest.mark.slow
def test_sigkill_during_writes_leaves_no_truncated_files(tmp_path, tiny_data, reference_run, sliced_run, capsys):
    # Start from a run directory holding the 1024-image checkpoint.
    run_dir = tmp_path / "run"
    shutil.copytree(sliced_run, run_dir)
    kwargs = tiny_kwargs(run_dir, tiny_data)

    def check_complete_files():
        for path in run_dir.glob("network-snapshot-*.pkl"):
            with open(path, "rb") as f:
                assert "ema" in pickle.load(f)
        for path in run_dir.glob("training-state-*.pt"):
            load_checkpoint(path)

    # Killed in the middle of writing the second snapshot of 2048 images.
    run_until_hook_then_kill(kwargs, "during_snapshot", "network-snapshot-0000002-0.100.pkl", tmp_path)
    assert (run_dir / "network-snapshot-0000002-0.050.pkl").is_file()
    assert not (run_dir / "network-snapshot-0000002-0.100.pkl").exists()
    assert list(run_dir.glob(".network-snapshot-0000002-0.100.pkl.*.tmp"))  # the partial temporary file
    check_complete_files()

    # Killed in the middle of writing the checkpoint of 2048 images: it resumed from 1024 again.
    run_until_hook_then_kill(kwargs, "during_checkpoint", "training-state-0000002.pt", tmp_path)
    assert not (run_dir / "training-state-0000002.pt").exists()
    assert list(run_dir.glob(".training-state-0000002.pt.*.tmp"))
    check_complete_files()

    # The next start resumes from the last complete checkpoint and ends exactly like the reference.
    capsys.readouterr()
    tl.training_loop(**kwargs)
    assert "training-state-0000001.pt" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir() if "tmp" in p.name) == []  # stale temporaries removed
    check_complete_files()
    assert_same_training_state(reference_run / "training-state-0000002.pt", run_dir / "training-state-0000002.pt")
    for a, b in zip(
        snapshot_tensors(reference_run / "network-snapshot-0000002-0.100.pkl"),
        snapshot_tensors(run_dir / "network-snapshot-0000002-0.100.pkl"),
    ):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# Distributed and accumulation mechanics, with a loss that makes no random draws.


def mechanics_kwargs(run_dir, data, **overrides) -> dict:
    kwargs = tiny_kwargs(
        run_dir,
        data,
        total_nimg=64 * 4,
        status_nimg=None,
        snapshot_nimg=None,
        checkpoint_nimg=1024,
        loss_kwargs=dict(class_name="tests.scripts.train_helpers.DeterministicLoss"),
        network_kwargs=dict(TINY_NET, dropout=0.0),
        # SGD: unlike Adam, its step scales with the gradient, so a wrong loss scale shows.
        optimizer_kwargs=dict(class_name="torch.optim.SGD"),
        lr_kwargs=dict(
            func_name="training.training_loop.learning_rate_schedule", ref_lr=0.01, ref_batches=0, rampup_Mimg=0
        ),
    )
    kwargs.update(overrides)
    return kwargs


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def compare_nets(path_a, path_b, tol):
    """Relative difference of all network weights (and of each EMA) taken together, below ``tol``.

    (Single scalars such as out_gain can pass near zero, where their own relative difference
    means little; the weights as a whole are what must agree.)"""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["state"]["cur_nimg"] == b["state"]["cur_nimg"]

    def flat(sd):
        return torch.cat([t.flatten().double() for t in sd.values()])

    assert list(a["net"]) == list(b["net"])
    assert rel_diff(flat(a["net"]), flat(b["net"])) < tol
    for ema_a, ema_b in zip(a["ema"]["emas"], b["ema"]["emas"]):
        assert rel_diff(flat(ema_a), flat(ema_b)) < tol


@pytest.fixture(scope="module")
def mechanics_reference(workdir, tiny_data):
    run_dir = workdir / "mechanics-one-process"
    tl.training_loop(**mechanics_kwargs(run_dir, tiny_data))
    return run_dir / "training-state-0000000.pt"


@pytest.mark.slow
def test_gradient_accumulation_matches_one_round(workdir, tiny_data, mechanics_reference):
    run_dir = workdir / "mechanics-accumulated"
    tl.training_loop(**mechanics_kwargs(run_dir, tiny_data, batch_gpu=16))  # 4 rounds of 16
    compare_nets(run_dir / "training-state-0000000.pt", mechanics_reference, tol=1e-5)


@pytest.mark.slow
def test_mechanics_comparison_detects_a_wrong_gradient_scale(workdir, tiny_data, mechanics_reference):
    # Gradients off by 10% (here: the learning rate, which SGD multiplies with them) fail the comparison.
    run_dir = workdir / "mechanics-scaled"
    tl.training_loop(
        **mechanics_kwargs(
            run_dir,
            tiny_data,
            lr_kwargs=dict(
                func_name="training.training_loop.learning_rate_schedule", ref_lr=0.011, ref_batches=0, rampup_Mimg=0
            ),
        )
    )
    with pytest.raises(AssertionError):
        compare_nets(run_dir / "training-state-0000000.pt", mechanics_reference, tol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(workdir, tiny_data, mechanics_reference):
    run_dir = workdir / "mechanics-two-processes"
    kwargs_file = workdir / "mechanics-two-processes.json"
    kwargs_file.write_text(json.dumps(mechanics_kwargs(run_dir, tiny_data)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_ROOT / "tests" / "scripts" / "train_run.py"),
        str(kwargs_file),
    ]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert_torchrun_succeeded(result)
    compare_nets(run_dir / "training-state-0000000.pt", mechanics_reference, tol=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager(workdir, tiny_data, mechanics_reference, capsys):
    run_dir = workdir / "mechanics-compiled"
    tl.training_loop(**mechanics_kwargs(run_dir, tiny_data, compile=True))
    assert "torch.compile failed" not in capsys.readouterr().out
    compare_nets(run_dir / "training-state-0000000.pt", mechanics_reference, tol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_compiled_training_in_two_processes_matches_one_process(workdir, tiny_data, mechanics_reference):
    run_dir = workdir / "mechanics-compiled-two-processes"
    kwargs_file = workdir / "mechanics-compiled-two-processes.json"
    kwargs_file.write_text(json.dumps(mechanics_kwargs(run_dir, tiny_data, compile=True)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO_ROOT / "tests" / "scripts" / "train_run.py"), str(kwargs_file)]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert_torchrun_succeeded(result)
    assert "torch.compile failed" not in result.stdout
    compare_nets(run_dir / "training-state-0000000.pt", mechanics_reference, tol=1e-5)


# ----------------------------------------------------------------------------
# Learning happens.


ARTIFACT_DIR = REPO_ROOT / "out" / "test-artifacts"


@pytest.mark.slow
def test_small_model_learns_digits(workdir):
    data = train_helpers.digits_dataset_zip(str(workdir / "digits16.zip"), resolution=16)
    run_dir = workdir / "digits"
    tl.training_loop(
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data, use_labels=True),
        encoder_kwargs=RGB_ENCODER,
        data_loader_kwargs=dict(class_name="torch.utils.data.DataLoader", num_workers=0),
        network_kwargs=dict(
            class_name="training.networks_edm2.Precond",
            model_channels=8,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[],
            logvar_channels=16,
        ),
        loss_kwargs=dict(class_name="training.training_loop.EDM2Loss", P_mean=-0.8, P_std=1.6),
        lr_kwargs=dict(
            func_name="training.training_loop.learning_rate_schedule", ref_lr=0.02, ref_batches=100, rampup_Mimg=0.0005
        ),
        ema_kwargs=dict(class_name="training.phema.PowerFunctionEMA", stds=[0.100]),
        run_dir=str(run_dir),
        seed=0,
        batch_size=32,
        total_nimg=2048,
        status_nimg=512,
        snapshot_nimg=2048,
        checkpoint_nimg=None,
    )

    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    losses = [s["Loss/loss"] for s in stats if s["Progress/kimg"] > 0]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses

    # A sample grid from the final snapshot, one row per class, for a person to look at.
    with open(run_dir / "network-snapshot-0000002-0.100.pkl", "rb") as f:
        data = pickle.load(f)
    net = data["ema"].float()
    labels = torch.eye(10).repeat_interleave(4, dim=0)
    images = train_helpers.heun_sample(net, labels, num_steps=12, seed=0)
    pixels = data["encoder"].decode(images).numpy()
    train_helpers.save_grid(pixels, str(ARTIFACT_DIR / "training-digits-grid.png"), cols=4)
    assert pixels.std() > 10  # not a constant image
