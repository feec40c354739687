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


class TrainingMonitor:
    """What ``train_edm2.py`` shows of a run besides ``log.txt`` and ``stats.jsonl``. Construct it on every process
    after resuming; then call ``report_loss`` after each loss evaluation, ``report_gradients`` before each optimizer
    step, ``on_status`` with the items of each stats.jsonl line (rank 0), ``on_snapshot`` at each snapshot (every
    process) and ``close``."""

    def __init__(
        self,
        run_dir: str,  # Run directory.
        start_nimg: int = 0,  # Image count the run (re)starts from.
        loss_fn: Any = None,  # The loss; its P_mean and P_std define the noise bands.
        device: Optional[torch.device] = None,
        tensorboard: bool = True,  # Write TensorBoard event files?
        grid: int = 64,  # Images in the sample grid at each snapshot; 0 = none.
        grid_steps: int = 32,  # Sampler steps of the grid.
        grid_batch: int = 64,  # Images per sampling batch of the grid.
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
        """The network to hand to the loss: records the noise levels it is called with."""
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

    def on_snapshot(self, cur_nimg: int, ema: Any, net: torch.nn.Module, encoder: Any) -> None:
        """Sample grid (rank 0) and metrics (all processes) of the first EMA profile."""
        if (self.grid <= 0 or self.rank != 0) and not self.metrics:
            return
        if ema is not None:
            net = ema.get()
            net = net[0][0] if isinstance(net, list) else net
        # The network as a snapshot file holds it (float16, eval mode), on the compute device.
        snapshot_net = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float16).to(self.device)
        if self._sampling_encoder is None:
            self._sampling_encoder = copy.copy(encoder)  # its own attributes: never alter the run's encoder
        kimg = cur_nimg // 1000
        if self.grid > 0 and self.rank == 0:
            self._write_grid(kimg, snapshot_net)
        if self.metrics:
            self._compute_metrics(kimg, snapshot_net)

    def _write_grid(self, kimg: int, snapshot_net: torch.nn.Module) -> None:
        import PIL.Image

        start = time.time()
        try:
            grid, rows, cols = sample_grid(
                snapshot_net, self._sampling_encoder, self.grid, self.device, self.grid_batch, num_steps=self.grid_steps
            )
        except Exception as err:  # e.g. a VAE that cannot be loaded: training goes on without grids
            dist.print0(f"Sample grid: failed ({dnnlib.util.one_line(err)}); no more grids in this run.")
            self.grid = 0
            return
        fname = f"samples-{kimg:07d}.png"
        with dnnlib.util.atomic_path(os.path.join(self.run_dir, fname)) as tmp:
            PIL.Image.fromarray(grid, "RGB").save(tmp, format="PNG")
        seconds = time.time() - start
        training_stats.report0("Timing/grid_sec", seconds)
        if self.writer is not None:
            self.writer.add_image("Samples/grid", grid, global_step=kimg, dataformats="HWC")
            self.writer.flush()
        dist.print0(f"Saved {fname} ({rows}x{cols} images, {self.grid_steps} steps) in {seconds:.1f} s")

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
