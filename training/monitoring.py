"""Watching a training run: TensorBoard curves, the loss by noise level, sample grids and metrics.

``TrainingMonitor`` is driven by a few one-line hooks of the training loop and never changes the training math: it
reads the loss tensor, the noise levels the loss drew (as the network receives them) and the gradients, and samples
from copies of the EMA networks with generators of its own. Unlike ``training_loop.py`` this module is not embedded
in network pickles, so it may import TensorBoard, PIL and the sampling and metrics libraries (lazily, where they are
needed). What it writes (event files, ``samples-*.png``, ``metrics-*.jsonl``, extra statistics) is described in the
README, "Watching a run".
"""

import copy
import json
import os
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats

# Phi^-1(0.25), Phi^-1(0.5), Phi^-1(0.75) of the standard normal distribution.
NORMAL_QUARTILES = (-0.6744897501960817, 0.0, 0.6744897501960817)
GRID_PAD = 2  # Black pixels around and between the tiles of a sample grid.
GRID_MAX_ROWS = 10  # A class-conditional grid shows the first classes, one row each.

# ----------------------------------------------------------------------------
# Loss by noise level.


def sigma_band_edges(P_mean: float, P_std: float) -> list[float]:
    """ln(sigma) edges of the four equally likely bands of ln(sigma) ~ N(P_mean, P_std^2)."""
    return [P_mean + P_std * q for q in NORMAL_QUARTILES]


def sigma_band(sigma: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """Band index 0..3 of each noise level (0 = least noise)."""
    edges = torch.tensor(sigma_band_edges(P_mean, P_std), dtype=torch.float64, device=sigma.device)
    return torch.bucketize(sigma.detach().to(torch.float64).log().flatten(), edges, right=True)


class SigmaRecorder:
    """Calls the network exactly as given and remembers the noise level (its second argument) of the latest
    call: the loss draws sigma inside ``EDM2Loss.__call__``, whose math and pickled state stay untouched."""

    def __init__(self, net: Any):
        self.net = net
        self.last_sigma: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.last_sigma = sigma
        return self.net(x, sigma, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["net"], name)


# ----------------------------------------------------------------------------
# Sample grids.


def grid_shape(num_images: int, label_dim: int) -> tuple[int, int]:
    """(rows, cols): one row per class (the first GRID_MAX_ROWS classes) for a conditional net,
    else a near-square grid; ``cols = num_images // rows`` (at least 1)."""
    rows = min(label_dim, GRID_MAX_ROWS, num_images) if label_dim > 0 else max(int(np.sqrt(num_images)), 1)
    return rows, max(num_images // rows, 1)


def grid_size(rows: int, cols: int, height: int, width: int, pad: int = GRID_PAD) -> tuple[int, int]:
    """(width, height) of a grid image: ``pad`` pixels around and between the tiles."""
    return cols * (width + pad) + pad, rows * (height + pad) + pad


def tile_grid(images: np.ndarray, rows: int, cols: int, pad: int = GRID_PAD) -> np.ndarray:
    """Tile NHWC uint8 images (row-major, rows*cols of them) into one HWC image on black."""
    n, h, w, c = images.shape
    width, height = grid_size(rows, cols, h, w, pad)
    grid = np.zeros([height, width, c], dtype=np.uint8)
    for idx in range(rows * cols):
        r, col = divmod(idx, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[idx]
    return grid


def grid_evaluations(num_steps: int) -> int:
    """Network evaluations per image of the default sampler: Heun's two per step, one on the last step."""
    return max(2 * num_steps - 1, 1)


def grid_within_budget(max_images: int, label_dim: int, budget_sec: float, sec_per_image: float) -> int:
    """Images of the largest grid of at most ``max_images`` whose estimated cost (``sec_per_image`` each)
    fits ``budget_sec``: whole columns for a conditional net (its rows stay the classes), else a
    near-square grid of fewer images. 0 = not even one column (one image) fits."""
    rows, cols = grid_shape(max_images, label_dim)
    per_column = sec_per_image * (rows if label_dim > 0 else 1)  # unconditional: a "column" of one image
    affordable = int(budget_sec // per_column) if per_column > 0 else max_images
    if label_dim > 0:
        return rows * min(cols, affordable)
    num_images = min(rows * cols, affordable)
    return int(np.prod(grid_shape(num_images, 0))) if num_images > 0 else 0


def sample_grid(
    net: torch.nn.Module,
    encoder: Any,
    num_images: int,
    device: torch.device,
    max_batch_size: int = 64,
    **sampler_kwargs: Any,
) -> tuple[np.ndarray, int, int]:
    """Sample the grid in this process alone: cell (r, c) is the image of seed c and (for a conditional
    net) class r, as ``generate_images(net, seeds=[c], class_idx=r)`` gives it. Returns (HWC uint8 grid,
    rows, cols)."""
    from training.sampling import generate_images

    rows, cols = grid_shape(num_images, net.label_dim)
    seeds = list(range(cols)) * rows  # A column shares its noise; row r has class r.
    classes = [r for r in range(rows) for _ in range(cols)] if net.label_dim > 0 else None
    batches = generate_images(
        net, encoder=encoder, seeds=seeds, class_idx=classes, max_batch_size=max_batch_size, verbose=False,
        device=device, distributed=False, encoder_batch_size=None, **sampler_kwargs,
    )  # fmt: skip
    images = np.concatenate([r.images.permute(0, 2, 3, 1).cpu().numpy() for r in batches])
    if images.shape[3] == 1:
        images = np.repeat(images, 3, axis=3)
    return tile_grid(images, rows, cols), rows, cols


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or dist.get_world_size() == 1:
        return flag
    on_nccl = torch.distributed.get_backend() == "nccl"
    x = torch.tensor([0 if flag else 1], dtype=torch.int64, device=(device if on_nccl else "cpu"))
    torch.distributed.all_reduce(x)
    return int(x.item()) == 0


def monitor_clock(device: torch.device) -> Any:
    """The clock of the grid budget, for training time and grid cost alike: this process's CPU time on a CPU
    (unaffected by other processes on the same cores), wall-clock time on an accelerator."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


class TrainingMonitor:
    """What ``train_edm2.py`` shows of a run besides ``log.txt`` and ``stats.jsonl``. Construct it on every process
    after resuming; then call ``report_loss`` after each loss evaluation, ``report_gradients`` before each optimizer
    step, ``on_status`` with the items of each stats.jsonl line (rank 0), ``on_snapshot`` at each snapshot (every
    process) and ``close``.

    The grid's cost is kept to ``grid_budget`` (8%, so that all monitoring stays within 10%) of the training time
    since the previous grid, both measured with ``monitor_clock`` (CPU time on a CPU: other processes sharing the
    cores slow training and grids alike, so their ratio holds); its cost per
    image and network evaluation is measured (from the last grid; before the first, from one sampler step on one
    column), and the grid is the largest of at most ``grid`` images (whole columns for a conditional net) whose
    estimated cost fits, else skipped with one line in the log. No grid of the untrained net at kimg 0 unless
    ``grid_at_start``."""

    def __init__(
        self,
        run_dir: str,  # Run directory.
        start_nimg: int = 0,  # Image count the run (re)starts from.
        loss_fn: Any = None,  # The loss; its P_mean and P_std define the noise bands.
        device: Optional[torch.device] = None,
        tensorboard: bool = True,  # Write TensorBoard event files?
        grid: int = 64,  # Images in the sample grid at each snapshot (at most); 0 = none.
        grid_steps: int = 32,  # Sampler steps of the grid.
        grid_batch: int = 64,  # Images per sampling batch of the grid.
        grid_budget: Optional[float] = 0.08,  # Grid cost / training time since the last grid; None = no limit.
        grid_at_start: bool = False,  # Also a full grid of the untrained network at kimg 0?
        metrics: Sequence[str] = (),  # Metrics at each snapshot, e.g. ('fid', 'fd_dinov2').
        metrics_images: int = 50000,  # Images generated for the metrics.
        metrics_ref: Optional[str] = None,  # Reference statistics (path or URL).
        metrics_seed: int = 0,  # First seed of the metrics images (calculate_metrics gen --seed).
        metrics_batch: int = 32,  # Images per process and batch (calculate_metrics gen --batch).
    ):
        self.run_dir = run_dir
        self.start_nimg = int(start_nimg)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rank = dist.get_rank()
        self.grid, self.grid_steps, self.grid_batch = int(grid), int(grid_steps), int(grid_batch)
        self.grid_budget, self.grid_at_start = grid_budget, bool(grid_at_start)
        self.clock = monitor_clock(self.device)  # tests may replace it
        # The budget of the next grid: training (or, without its time, wall-clock) seconds since the last grid.
        self._last_grid_training_sec, self._last_grid_time = 0.0, self.clock()
        self.sec_per_image_eval: Optional[float] = None  # grid cost per image and network evaluation, once measured
        self.metrics = list(metrics)
        self.metrics_images, self.metrics_ref = int(metrics_images), metrics_ref
        self.metrics_seed, self.metrics_batch = int(metrics_seed), int(metrics_batch)
        self.recorder: Optional[SigmaRecorder] = None
        has_bands = hasattr(loss_fn, "P_mean") and hasattr(loss_fn, "P_std")
        self.bands = (float(loss_fn.P_mean), float(loss_fn.P_std)) if has_bands else None
        self._sampling_encoder = self._ref_stats = self.writer = None
        self._detectors_checked = False

        # Validate before any training: the metrics need their reference statistics.
        if self.metrics:
            if metrics_ref is None:
                raise ValueError("metrics during training need reference statistics (metrics_ref)")
            if self.rank == 0:
                from training.metrics import load_stats

                self._ref_stats = load_stats(metrics_ref, verbose=False)
        if tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                dist.print0(
                    f"TensorBoard: not available ({dnnlib.util.one_line(err)}); install tensorboard to get event files."
                )
            else:
                # One past the resumed kimg: the resumed run's first point comes after it, and
                # anything a killed run wrote beyond its last checkpoint is superseded.
                purge_step = self.start_nimg // 1000 + 1 if self.start_nimg > 0 else None
                self.writer = SummaryWriter(log_dir=run_dir, purge_step=purge_step)

    def wrap_net(self, net: Any) -> Any:
        """The network to hand to the loss (wrap it once per run): records the noise levels it is called with."""
        self.recorder = SigmaRecorder(net)
        return self.recorder

    def report_loss(self, loss: torch.Tensor) -> None:
        """Report the per-sample loss by noise band (the loss of the latest network call)."""
        if self.bands is None or self.recorder is None or self.recorder.last_sigma is None:
            return
        sigma, self.recorder.last_sigma = self.recorder.last_sigma, None
        per_sample = loss.detach().reshape(loss.shape[0], -1).mean(dim=1)
        if sigma.numel() != per_sample.numel():
            return
        band = sigma_band(sigma, *self.bands)
        nan = torch.full_like(per_sample, float("nan"))  # non-finite samples are left out of a statistic
        for k in range(len(NORMAL_QUARTILES) + 1):
            training_stats.report(f"Loss/loss_sigma_q{k}", torch.where(band == k, per_sample, nan))

    def report_gradients(self, net: torch.nn.Module, loss_scaling: float = 1) -> None:
        """Report the L2 norm of the gradient the optimizer is about to use (without loss scaling)."""
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if not grads:
            return
        total = torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in torch._foreach_norm(grads)]))
        training_stats.report("Loss/grad_norm", total / loss_scaling)

    def on_status(self, cur_nimg: int, items: Sequence[tuple[str, float]]) -> None:
        """Write the statistics of one stats.jsonl line (name, value) as TensorBoard scalars."""
        if self.writer is None:
            return
        values = dict(items)
        walltime = values.pop("timestamp", None)
        step = int(cur_nimg // 1000)
        for name, value in values.items():
            if np.isfinite(value) and not name.startswith("Metrics/"):  # metrics go in at their snapshot's kimg
                self.writer.add_scalar(name, value, global_step=step, walltime=walltime)
        self.writer.flush()

    def on_snapshot(
        self, cur_nimg: int, ema: Any, net: torch.nn.Module, encoder: Any, training_sec: Optional[float] = None
    ) -> None:
        """Sample grid (rank 0) and metrics (all processes) of the first EMA profile. ``training_sec``: the time
        this invocation has spent in optimization steps so far (None = measure wall-clock time instead)."""
        draw_grid = self.grid > 0 and self.rank == 0 and (cur_nimg > 0 or self.grid_at_start)
        if not draw_grid and not self.metrics:
            return
        if ema is not None:
            net = ema.get()
            net = net[0][0] if isinstance(net, list) else net
        # The network as a snapshot file holds it (float16, eval mode), on the compute device.
        snapshot_net = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float16).to(self.device)
        if self._sampling_encoder is None:
            self._sampling_encoder = copy.copy(encoder)  # its own attributes: never alter the run's encoder
        kimg = cur_nimg // 1000
        if draw_grid:
            self._write_grid(kimg, snapshot_net, training_sec, full=(cur_nimg == 0))
        if self.metrics:
            self._compute_metrics(kimg, snapshot_net)

    def _measure_sec_per_image_eval(self, snapshot_net: torch.nn.Module) -> float:
        """Seconds per image and network evaluation, from one sampler step on one column of the grid (after
        one on a single image, which loads and warms up what sampling needs). A small batch costs more
        per image than a large one: the estimate errs on the side of a smaller grid."""
        column = grid_shape(self.grid, snapshot_net.label_dim)[0] if snapshot_net.label_dim > 0 else 4
        for num_images in [1, min(self.grid, self.grid_batch, column)]:
            start = self.clock()
            _, rows, cols = sample_grid(
                snapshot_net, self._sampling_encoder, num_images, self.device, self.grid_batch, num_steps=1
            )
        return (self.clock() - start) / (rows * cols)

    def _grid_size(self, snapshot_net: torch.nn.Module, training_sec: Optional[float]) -> tuple[int, str]:
        """Images of the grid that fits the budget (0 = skip it) and the reason, in a few words."""
        if self.grid_budget is None:
            return self.grid, ""
        start = self.clock()
        if self.sec_per_image_eval is None:
            self.sec_per_image_eval = self._measure_sec_per_image_eval(snapshot_net)
        since = training_sec - self._last_grid_training_sec if training_sec is not None else None
        since = since if since is not None else start - self._last_grid_time
        budget = self.grid_budget * since - (self.clock() - start)  # measuring is part of the grid's cost
        sec_per_image = self.sec_per_image_eval * grid_evaluations(self.grid_steps)
        num_images = grid_within_budget(self.grid, snapshot_net.label_dim, budget, sec_per_image)
        why = f"{self.grid_budget:.0%} of the {since:.1f} s of training since the last grid"
        if num_images == 0:
            rows = grid_shape(self.grid, snapshot_net.label_dim)[0] if snapshot_net.label_dim > 0 else 1
            what = f"one column ({rows} images)" if rows > 1 else "one image"
            why = f"{what} would take ~{sec_per_image * rows:.1f} s, over {why}"
        return num_images, why

    def _write_grid(self, kimg: int, snapshot_net: torch.nn.Module, training_sec: Optional[float], full: bool) -> None:
        import PIL.Image

        start = self.clock()
        try:
            num_images, why = (self.grid, "") if full else self._grid_size(snapshot_net, training_sec)
            if num_images == 0:
                dist.print0(f"Sample grid at kimg {kimg} skipped: {why}")
                return
            sampling_start = self.clock()
            grid, rows, cols = sample_grid(
                snapshot_net,
                self._sampling_encoder,
                num_images,
                self.device,
                self.grid_batch,
                num_steps=self.grid_steps,
            )
        except Exception as err:  # e.g. a VAE that cannot be loaded: training goes on without grids
            dist.print0(f"Sample grid: failed ({dnnlib.util.one_line(err)}); no more grids in this run.")
            self.grid = 0
            return
        self.sec_per_image_eval = (self.clock() - sampling_start) / (rows * cols * grid_evaluations(self.grid_steps))
        fname = f"samples-{kimg:07d}.png"
        with dnnlib.util.atomic_path(os.path.join(self.run_dir, fname)) as tmp:
            PIL.Image.fromarray(grid, "RGB").save(tmp, format="PNG")
        seconds = self.clock() - start
        training_stats.report0("Timing/grid_sec", seconds)
        if self.writer is not None:
            self.writer.add_image("Samples/grid", grid, global_step=kimg, dataformats="HWC")
            self.writer.flush()
        shrunk = f"; {num_images} of {self.grid} images, within {why}" if num_images < self.grid and why else ""
        dist.print0(f"Saved {fname} ({rows}x{cols} images, {self.grid_steps} steps{shrunk}) in {seconds:.1f} s")
        self._last_grid_training_sec = training_sec if training_sec is not None else 0.0
        self._last_grid_time = self.clock()

    def _check_detectors(self) -> None:
        """Load each metric's detector once; drop (with one line in the log) those that fail."""
        from training.metrics import get_detector

        available = []
        for metric in self.metrics:
            message = None
            try:
                get_detector(metric, verbose=False)
            except Exception as err:  # e.g. offline without the detector's files
                message = err.format_message() if hasattr(err, "format_message") else str(err)
            if _all_ranks_agree(message is None, self.device):
                available.append(metric)
            else:
                message = "another process cannot load its detector" if message is None else message
                why = dnnlib.util.one_line(Exception(message))
                dist.print0(f"Metrics: skipping {metric} in this run; training goes on. {why}")
        self.metrics = available
        self._detectors_checked = True

    def _compute_metrics(self, kimg: int, snapshot_net: torch.nn.Module) -> None:
        from training.metrics import calculate_metrics_from_stats, calculate_stats_for_iterable
        from training.sampling import generate_images

        if not self._detectors_checked:
            self._check_detectors()
        if not self.metrics:
            return
        start = time.time()
        seeds = range(self.metrics_seed, self.metrics_seed + self.metrics_images)
        kwargs = dict(verbose=False, device=self.device)
        image_iter = generate_images(
            snapshot_net, encoder=self._sampling_encoder, seeds=seeds, max_batch_size=self.metrics_batch, **kwargs
        )
        last = None
        for result in calculate_stats_for_iterable(image_iter, metrics=self.metrics, **kwargs):
            last = result
        if self.rank != 0:
            return
        results = calculate_metrics_from_stats(last.stats, self._ref_stats, metrics=self.metrics, verbose=False)
        seconds = time.time() - start
        record = dict(results=results, kimg=kimg, num_images=self.metrics_images, seed=self.metrics_seed)
        record.update(ref=self.metrics_ref, timestamp=time.time())
        fname = f"metrics-{kimg:07d}.jsonl"
        with dnnlib.util.atomic_write(os.path.join(self.run_dir, fname), mode="w") as f:
            f.write(json.dumps(record) + "\n")
        for metric, value in results.items():
            training_stats.report0(f"Metrics/{metric}", value)
            if self.writer is not None:
                self.writer.add_scalar(f"Metrics/{metric}", value, global_step=kimg)
        training_stats.report0("Timing/metrics_sec", seconds)
        if self.writer is not None:
            self.writer.flush()
        dist.print0(f"Saved {fname}: " + ", ".join(f"{m} {v:g}" for m, v in results.items()) + f" in {seconds:.1f} s")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
