"""Tests of training/monitoring.py: the noise bands against the normal quantiles, the grid layout,
and short CPU runs whose TensorBoard curves equal stats.jsonl, continue across a resume without
duplicates or gaps, whose grids are deterministic, whose metrics equal calculate_metrics gen on the
snapshot, and which go on when a detector is unavailable. Monitoring never changes the training."""

import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch

import calculate_metrics as cm
import generate_images
from tests.scripts import metrics_detectors as md
from tests.scripts import train_helpers
from training import monitoring
from training import training_loop as tl

TINY_NET = dict(
    class_name="training.networks_edm2.Precond",
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    logvar_channels=8,
)

# ----------------------------------------------------------------------------
# Units.


def test_sigma_bands_are_quartiles_of_the_training_distribution():
    P_mean, P_std = -0.8, 1.6
    sigma = (
        torch.randn([200000], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * P_std + P_mean
    ).exp()
    counts = np.bincount(monitoring.sigma_band(sigma, P_mean, P_std).numpy(), minlength=4)
    np.testing.assert_allclose(counts / len(sigma), 0.25, atol=0.005)
    # The edges: P_mean + P_std * Phi^-1(q), with Phi the standard normal CDF.
    from scipy.stats import norm

    np.testing.assert_allclose(monitoring.sigma_band_edges(P_mean, P_std), P_mean + P_std * norm.ppf([0.25, 0.5, 0.75]))


def test_band_losses_average_to_the_loss():
    """Per band, the mean over its samples; the count-weighted band means give Loss/loss."""
    torch.manual_seed(0)
    net = lambda x, sigma, labels, return_logvar: (x * 0.5, torch.zeros_like(x[:, :1]))  # noqa: E731
    loss_fn = tl.EDM2Loss(P_mean=-0.4, P_std=1.0)
    mon = monitoring.TrainingMonitor(run_dir=".", loss_fn=loss_fn, tensorboard=False, grid=0)
    loss = loss_fn(net=mon.wrap_net(net), images=torch.randn([64, 3, 4, 4]))
    sigma = mon.recorder.last_sigma.flatten()
    from torch_utils import training_stats

    training_stats.reset()
    mon.report_loss(loss)
    training_stats.default_collector.update()
    stats = training_stats.default_collector.as_dict()
    per_sample = loss.mean(dim=[1, 2, 3])
    edges = monitoring.sigma_band_edges(-0.4, 1.0)
    band = np.searchsorted(edges, sigma.log().numpy(), side="right")
    total = 0
    for k in range(4):
        s = stats[f"Loss/loss_sigma_q{k}"]
        assert s.num == (band == k).sum()
        np.testing.assert_allclose(s.mean, per_sample[torch.from_numpy(band == k)].mean().item(), rtol=1e-6)
        total += s.mean * s.num
    np.testing.assert_allclose(total / 64, loss.mean().item(), rtol=1e-6)


def test_grid_layout():
    assert monitoring.grid_shape(64, 10) == (10, 6) and monitoring.grid_shape(64, 4) == (4, 16)
    assert monitoring.grid_shape(16, 0) == (4, 4)
    images = np.arange(6 * 3 * 2 * 3, dtype=np.uint8).reshape(6, 3, 2, 3)
    grid = monitoring.tile_grid(images, rows=2, cols=3, pad=2)
    assert grid.shape == (2 * 3 + 3 * 2, 3 * 2 + 4 * 2, 3)
    assert (grid[2:5, 2 + 1 * 4 : 2 + 1 * 4 + 2] == images[1]).all()  # row 0, column 1
    assert (grid[2 + 5 : 2 + 5 + 3, 2 + 2 * 4 : 2 + 2 * 4 + 2] == images[5]).all()  # row 1, column 2
    assert grid[0].max() == 0 and grid[:, 0].max() == 0


def test_progress_picture_tiles_grids_in_kimg_order(tmp_path):
    import sys

    from tests.conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import demo_progress

    for kimg, value in [(32, 100), (0, 0), (5, 200)]:
        PIL.Image.fromarray(np.full([6, 4, 3], value, dtype=np.uint8)).save(tmp_path / f"samples-{kimg:07d}.png")
    size = demo_progress.make_progress(str(tmp_path), str(tmp_path / "progress.png"), scale=2, gap=8, label_height=16)
    assert size == demo_progress.progress_size(3, 4, 6, 2, 8, 16) == (3 * (8 + 8) + 8, 16 + 12 + 16)
    pixels = np.asarray(PIL.Image.open(tmp_path / "progress.png"))
    top = 8 + 16
    assert [pixels[top, 8 + i * 16, 0] for i in range(3)] == [0, 200, 100]  # kimg 0, 5, 32
    with pytest.raises(FileNotFoundError):
        demo_progress.make_progress(str(tmp_path / "progress.png") + "-none", str(tmp_path / "x.png"))


# ----------------------------------------------------------------------------
# Short runs.


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return train_helpers.random_dataset_zip(
        str(tmp_path_factory.mktemp("mon") / "data.zip"), num_images=64, resolution=8, num_classes=4
    )


def run_kwargs(run_dir, data, monitor=None, **overrides):
    kwargs = dict(
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=str(data), use_labels=True),
        encoder_kwargs=dict(class_name="training.encoders.StandardRGBEncoder"),
        data_loader_kwargs=dict(class_name="torch.utils.data.DataLoader", num_workers=0),
        network_kwargs=TINY_NET,
        loss_kwargs=dict(class_name="training.training_loop.EDM2Loss", P_mean=-0.8, P_std=1.6),
        lr_kwargs=dict(
            func_name="training.training_loop.learning_rate_schedule", ref_lr=0.01, ref_batches=16, rampup_Mimg=0.0005
        ),
        run_dir=str(run_dir),
        seed=3,
        batch_size=64,
        total_nimg=2048,
        status_nimg=1024,
        snapshot_nimg=1024,
        checkpoint_nimg=1024,
        monitor_kwargs=monitor,
    )
    kwargs.update(overrides)
    return kwargs


def monitor_kwargs(**overrides):
    return dict(dict(class_name="training.monitoring.TrainingMonitor", grid=8, grid_steps=3), **overrides)


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc


def read_stats(run_dir):
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_tensorboard_grids_and_resume(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    tl.training_loop(**run_kwargs(run_dir, tiny_data, monitor=monitor_kwargs()))
    stats = read_stats(run_dir)
    assert [s["Progress/kimg"] for s in stats] == [0, 1.024, 2.048]
    loss, acc = read_scalars(run_dir, "Loss/loss")
    assert [step for step, _ in loss] == [1, 2]  # one point per tick with a loss; step = kimg
    np.testing.assert_allclose([v for _, v in loss], [s["Loss/loss"] for s in stats[1:]], rtol=1e-5)
    for tag in [
        "Loss/learning_rate",
        "Loss/grad_norm",
        "Loss/loss_sigma_q0",
        "Loss/loss_sigma_q3",
        "Timing/sec_per_kimg",
    ]:
        values = read_scalars(run_dir, tag)[0]
        np.testing.assert_allclose([v for _, v in values], [s[tag] for s in stats[-len(values) :]], rtol=1e-5)
    assert all(s["Loss/grad_norm"] > 0 for s in stats[1:])
    assert len(acc.Images("Samples/grid")) == 3

    # Grids: one per snapshot (kimg 0, 1, 2); 4 classes x 2 seeds of 8x8 with 2-pixel padding.
    for kimg in [0, 1, 2]:
        with PIL.Image.open(run_dir / f"samples-{kimg:07d}.png") as im:
            assert im.size == monitoring.grid_size(4, 2, 8, 8) == (2 * 10 + 2, 4 * 10 + 2) and im.mode == "RGB"
    # Cell (class 2, seed 1) is what generate_images gives for that seed and class on the snapshot file.
    snapshot = generate_images.load_network_pickle(str(run_dir / "network-snapshot-0000002-0.050.pkl"))
    ref = next(
        iter(generate_images.generate_images(snapshot["ema"], seeds=[1], class_idx=2, num_steps=3, verbose=False))
    )
    grid = np.asarray(PIL.Image.open(run_dir / "samples-0000002.png"))
    np.testing.assert_array_equal(
        grid[2 + 2 * 10 : 2 + 2 * 10 + 8, 2 + 10 : 2 + 10 + 8], ref.images[0].permute(1, 2, 0).numpy()
    )

    # Resume as after a crash past the last checkpoint: the kimg-2 point is written again, once.
    first_grid = (run_dir / "samples-0000002.png").read_bytes()
    os.remove(run_dir / "training-state-0000002.pt")
    tl.training_loop(**run_kwargs(run_dir, tiny_data, monitor=monitor_kwargs()))
    assert (run_dir / "samples-0000002.png").read_bytes() == first_grid  # deterministic
    stats = read_stats(run_dir)
    assert [s["Progress/kimg"] for s in stats] == [0, 1.024, 2.048, 2.048]
    loss, _ = read_scalars(run_dir, "Loss/loss")
    assert [step for step, _ in loss] == [1, 2]
    np.testing.assert_allclose(loss[-1][1], stats[-1]["Loss/loss"], rtol=1e-5)
    assert len([n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents")]) == 2

    # A slice: continuing to 3Ki adds exactly the next point.
    tl.training_loop(**run_kwargs(run_dir, tiny_data, monitor=monitor_kwargs(), total_nimg=3072))
    assert [step for step, _ in read_scalars(run_dir, "Loss/loss")[0]] == [1, 2, 3]


@pytest.mark.slow
def test_monitoring_changes_nothing_and_metrics_match_gen(tiny_data, tmp_path, monkeypatch, single_process_cli):
    """Monitoring with metrics (fid by a stand-in detector, fd_dinov2 unavailable) against a run
    without monitoring: the same snapshots and losses; one line about fd_dinov2; fid per snapshot
    equal to calculate_metrics gen on that snapshot file."""
    monkeypatch.setattr("training.metrics._detector_cache", {})
    cm.register_detector("fid", md.PoolDetector())
    monkeypatch.setenv("EDM2_DINOV2_REPO", str(tmp_path / "no-such-repo"))
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "cache"))
    ref_path = str(tmp_path / "ref.pkl")
    for _ in cm.calculate_stats_for_files(tiny_data, metrics=["fid"], num_workers=0, verbose=False, dest_path=ref_path):
        pass

    plain, watched = tmp_path / "plain", tmp_path / "watched"
    tl.training_loop(**run_kwargs(plain, tiny_data, total_nimg=1024))
    logger_lines = []
    monkeypatch.setattr(
        monitoring.dist, "print0", lambda *args, **kwargs: logger_lines.append(" ".join(map(str, args)))
    )
    tl.training_loop(
        **run_kwargs(
            watched,
            tiny_data,
            total_nimg=1024,
            monitor=monitor_kwargs(
                grid=0, metrics=["fid", "fd_dinov2"], metrics_images=6, metrics_ref=ref_path, metrics_batch=4
            ),
        )
    )

    # Nothing changed in what training writes.
    for name in ["network-snapshot-0000001-0.050.pkl", "network-snapshot-0000001-0.100.pkl"]:
        a, b = (generate_images.load_network_pickle(str(d / name))["ema"] for d in (plain, watched))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [s["Loss/loss"] for s in read_stats(plain)[1:]] == [s["Loss/loss"] for s in read_stats(watched)[1:]]
    assert not [n for n in os.listdir(watched) if n.startswith("samples-")]  # grid=0

    # The unavailable detector: one line, and the metrics that work go on.
    skipped = [line for line in logger_lines if "fd_dinov2" in line]
    assert len(skipped) == 1 and "skipping fd_dinov2" in skipped[0] and "\n" not in skipped[0]
    for kimg in [0, 1]:
        records = [json.loads(line) for line in (watched / f"metrics-{kimg:07d}.jsonl").read_text().splitlines()]
        assert len(records) == 1 and list(records[0]["results"]) == ["fid"] and records[0]["num_images"] == 6
        # What `calculate_metrics.py gen` prints for that snapshot (as '%g', so to 6 digits).
        result = single_process_cli(
            cm.cmdline,
            "gen",
            "--net",
            watched / f"network-snapshot-{kimg:07d}-0.050.pkl",
            "--ref",
            ref_path,
            "--metrics=fid",
            "--num=6",
            "--seed=0",
            "--batch=4",
        )
        assert result.exit_code == 0, result.output
        expected = float(re.search(r"^fid = (\S+)$", result.output, re.M).group(1))
        assert records[0]["results"]["fid"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    metrics, _ = read_scalars(watched, "Metrics/fid")
    assert [step for step, _ in metrics] == [0, 1]
