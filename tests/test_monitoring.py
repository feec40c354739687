"""Tests of training/monitoring.py: the noise bands against the normal quantiles, the grid layout,
and short CPU runs whose TensorBoard curves equal stats.jsonl, continue across a resume without
duplicates or gaps, whose grids are deterministic, whose metrics equal calculate_metrics gen on the
snapshot, and which go on when a detector is unavailable. Monitoring never changes the training."""

import json
import os
import re
import time

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
# The grid's budget: 10% of the training time since the last grid, at a measured cost per image.


def test_grid_within_budget_takes_whole_columns_or_a_smaller_square():
    # Conditional, 4 classes: 4 rows x 16 columns at most; a column of 4 images costs 4 s here.
    assert [monitoring.grid_within_budget(64, 4, budget, 1.0) for budget in [3.9, 4.0, 8.5, 63.9, 1e9]] == [
        0,
        4,
        8,
        60,
        64,
    ]
    # Unconditional: 8x8 at most; 10 affordable images give the near-square 3x3.
    assert [monitoring.grid_within_budget(64, 0, budget, 1.0) for budget in [0.5, 1.0, 10.5, 1e9]] == [0, 1, 9, 64]
    assert monitoring.grid_within_budget(64, 0, 5.0, 0.0) == 64  # free: the full grid
    assert monitoring.grid_evaluations(32) == 63 and monitoring.grid_evaluations(1) == 1  # Heun: 2 per step, 1 last


class FakeCosts:
    """A clock that advances only when a grid is sampled: ``sec`` per image and network evaluation."""

    def __init__(self, monkeypatch, sec=0.1):
        self.now, self.sec, self.sampled = 0.0, sec, []
        real = monitoring.sample_grid

        def sample_grid(net, encoder, num_images, device, max_batch_size=64, num_steps=32):
            grid, rows, cols = real(net, encoder, num_images, device, max_batch_size, num_steps=num_steps)
            self.now += self.sec * rows * cols * monitoring.grid_evaluations(num_steps)
            self.sampled.append((rows, cols, num_steps))
            return grid, rows, cols

        monkeypatch.setattr(monitoring, "sample_grid", sample_grid)

    def __call__(self):
        return self.now


def grid_monitor(tmp_path, monkeypatch, **kwargs):
    from training.encoders import StandardRGBEncoder

    torch.manual_seed(0)
    net = tl.dnnlib.util.construct_class_by_name(**TINY_NET, img_resolution=8, img_channels=3, label_dim=4)
    kwargs = {"grid_budget": 0.1, **kwargs}  # round numbers below: a tenth of the training time
    mon = monitoring.TrainingMonitor(run_dir=str(tmp_path), tensorboard=False, grid=8, grid_steps=3, **kwargs)
    mon.clock = costs = FakeCosts(monkeypatch)
    lines = []
    monkeypatch.setattr(monitoring.dist, "print0", lambda *args, **kw: lines.append(" ".join(map(str, args))))

    def snapshot(kimg, training_sec):
        mon.on_snapshot(kimg * 1024, ema=None, net=net, encoder=StandardRGBEncoder(), training_sec=training_sec)
        path = tmp_path / f"samples-{kimg:07d}.png"
        return PIL.Image.open(path).size if path.exists() else None

    return snapshot, costs, lines


def test_grid_is_skipped_shrunk_or_full_as_its_budget_allows(tmp_path, monkeypatch):
    # 4 classes x 2 seeds at most, 3 steps (5 evaluations per image) at 0.1 s each: a column costs 2 s.
    snapshot, costs, lines = grid_monitor(tmp_path, monkeypatch)
    column, full = monitoring.grid_size(4, 1, 8, 8), monitoring.grid_size(4, 2, 8, 8)
    assert snapshot(0, training_sec=0.0) is None and costs.sampled == [] and lines == []  # untrained: no grid, no line

    # 10 s of training: 1 s budget, less the 0.5 s of measuring (1 image, then one column, one step each).
    assert snapshot(1, training_sec=10.0) is None
    assert costs.sampled == [(1, 1, 1), (4, 1, 1)]
    assert len(lines) == 1 and "skipped" in lines[0] and "one column (4 images) would take ~2.0 s" in lines[0]

    # The budget accumulates since the last grid: 30 s of training, 3 s, one column (no new measurement).
    assert snapshot(2, training_sec=30.0) == column and costs.sampled[2:] == [(4, 1, 3)]
    assert lines[-1].startswith("Saved samples-0000002.png (4x1 images, 3 steps; 4 of 8 images, within 10%")
    assert snapshot(3, training_sec=60.0) == column  # 30 s since that grid: again one column
    assert snapshot(4, training_sec=75.0) is None  # 15 s: not enough
    assert snapshot(5, training_sec=200.0) == full  # 140 s: the full grid
    assert costs.sampled[3:] == [(4, 1, 3), (4, 2, 3)]


def test_grid_cost_is_measured_from_the_last_grid(tmp_path, monkeypatch):
    snapshot, costs, _ = grid_monitor(tmp_path, monkeypatch)
    snapshot(1, training_sec=100.0)  # measured at 0.1 s: the full grid (4 s) fits 10 s less 0.5 s of measuring
    assert costs.sampled[-1] == (4, 2, 3)
    costs.sec = (
        0.3  # the next grid's cost is estimated from this one's: 4 images x 5 evaluations x 0.3 s = 6 s a column
    )
    snapshot(2, training_sec=200.0)  # 10 s budget at the old cost: the full grid, which measures the new cost
    assert snapshot(3, training_sec=250.0) is None  # 5 s < 6 s
    assert snapshot(4, training_sec=290.0) == monitoring.grid_size(4, 1, 8, 8)  # 9 s: one column


def test_default_budget_and_clock():
    """8% of the training time by default (all monitoring within 10%), CPU time on a CPU, wall time elsewhere."""
    mon = monitoring.TrainingMonitor(run_dir=".", tensorboard=False, device="cpu")
    assert mon.grid_budget == 0.08 and mon.clock is time.process_time
    assert monitoring.monitor_clock(torch.device("cuda")) is time.perf_counter


def test_grid_at_start_and_without_budget_draw_the_full_grid(tmp_path, monkeypatch):
    full = monitoring.grid_size(4, 2, 8, 8)
    (tmp_path / "start").mkdir()
    snapshot, costs, _ = grid_monitor(tmp_path / "start", monkeypatch, grid_at_start=True)
    assert snapshot(0, training_sec=0.0) == full and costs.sampled == [(4, 2, 3)]  # no measurement either
    assert snapshot(1, training_sec=1.0) is None  # then the budget again, from kimg 0
    (tmp_path / "any").mkdir()
    snapshot, costs, _ = grid_monitor(tmp_path / "any", monkeypatch, grid_budget=None)
    assert snapshot(0, training_sec=0.0) is None  # still no grid of the untrained net
    assert snapshot(1, training_sec=0.0) == full


class CountingMonitor(monitoring.TrainingMonitor):
    """Counts the network wrappers it hands out and the losses it is given."""

    wraps = losses = 0

    def wrap_net(self, net):
        CountingMonitor.wraps += 1
        return super().wrap_net(net)

    def report_loss(self, loss):
        CountingMonitor.losses += 1
        super().report_loss(loss)


def test_training_wraps_the_network_once(tmp_path, tiny_data):
    CountingMonitor.wraps = CountingMonitor.losses = 0
    monitor = dict(class_name="tests.test_monitoring.CountingMonitor", tensorboard=False, grid=0)
    kw = dict(total_nimg=192, status_nimg=64, snapshot_nimg=None, checkpoint_nimg=None)
    tl.training_loop(**run_kwargs(tmp_path / "run", tiny_data, monitor=monitor, **kw))
    assert CountingMonitor.wraps == 1 and CountingMonitor.losses == 3
    stats = read_stats(tmp_path / "run")  # one tick per step: every band has samples
    assert len(stats) == 4 and all(np.isfinite(s[f"Loss/loss_sigma_q{k}"]) for s in stats[1:] for k in range(4))


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
    """Every grid in full (also at kimg 0), whatever the training costs."""
    kwargs = dict(class_name="training.monitoring.TrainingMonitor", grid=8, grid_steps=3)
    return dict(kwargs, grid_budget=None, grid_at_start=True, **overrides)


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
