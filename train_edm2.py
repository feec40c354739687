"""Train EDM2 diffusion models: resolve a preset plus command-line overrides into a training
configuration, create or resume the run directory, and call the training loop.

Runs as one process (``python train_edm2.py ...``) or as several under ``torchrun``; uses CUDA when
available, else the CPU (where float16 is never used). Besides the paper's twelve presets there are
CPU-scale presets (``cpu-16``, ``cpu-32``) for training small class-conditional models on small
datasets in minutes.

Resuming: rerunning the command continues from the latest checkpoint. Options that change the math
of the run must equal those in ``training_options.json`` (kept as written at creation); options that
only change how it runs may differ, and are printed and appended to ``training_options-resume.jsonl``
(see ``RUNTIME_OPTIONS`` and the README).
"""

import copy
import hashlib
import json
import os
import re
import time
import warnings
from typing import Any, Optional

import click
import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import training_loop

warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")  # DDP on channels-last grads

# ----------------------------------------------------------------------------
# Configuration presets: the one table of training presets (also read by count_flops.py and the
# help text).
#
# The paper's presets (its training configurations) set the duration, batch, model width,
# learning rate and decay, dropout and the noise distribution; the network keeps the paper's
# architecture (channel_mult [1,2,3,4], num_blocks 3, attention at 16x16 and 8x8).
#
# The CPU presets go further, because the paper's recipe does not scale down by width alone (a
# 64-channel XXS model still has 31M parameters): a narrow, shallow network (~0.3M parameters) with
# attention only at 4x4 (16 channels per head, so that these blocks have heads); the pixel-space
# noise distribution P_mean -0.8 / P_std 1.6, because small batches rarely draw the high noise
# levels that sampling starts from with -0.4 / 1.0; the learning-rate ramp-up and decay scaled down
# to a run of a few minutes on two cores; frequent status lines, snapshots and checkpoints. The
# README ("CPU-scale presets") tabulates them.

# fmt: off
config_presets = {
    'edm2-img512-xxs':  dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=64,  lr=0.0170, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-img512-xs':   dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=128, lr=0.0120, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-img512-s':    dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=192, lr=0.0100, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-img512-m':    dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=256, lr=0.0090, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img512-l':    dnnlib.EasyDict(duration=1792 << 20, batch=2048, channels=320, lr=0.0080, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img512-xl':   dnnlib.EasyDict(duration=1280 << 20, batch=2048, channels=384, lr=0.0070, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img512-xxl':  dnnlib.EasyDict(duration=896 << 20,  batch=2048, channels=448, lr=0.0065, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img64-xs':    dnnlib.EasyDict(duration=1024 << 20, batch=2048, channels=128, lr=0.0120, decay=35000, dropout=0.00, P_mean=-0.8, P_std=1.6),
    'edm2-img64-s':     dnnlib.EasyDict(duration=1024 << 20, batch=2048, channels=192, lr=0.0100, decay=35000, dropout=0.00, P_mean=-0.8, P_std=1.6),
    'edm2-img64-m':     dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=256, lr=0.0090, decay=35000, dropout=0.10, P_mean=-0.8, P_std=1.6),
    'edm2-img64-l':     dnnlib.EasyDict(duration=1024 << 20, batch=2048, channels=320, lr=0.0080, decay=35000, dropout=0.10, P_mean=-0.8, P_std=1.6),
    'edm2-img64-xl':    dnnlib.EasyDict(duration=640 << 20,  batch=2048, channels=384, lr=0.0070, decay=35000, dropout=0.10, P_mean=-0.8, P_std=1.6),

    # CPU scale (see above). cpu-16 suits 16x16 data such as scikit-learn's digits upscaled;
    # cpu-32 suits 32x32 data such as Fashion-MNIST padded to 32x32.
    'cpu-16':           dnnlib.EasyDict(duration=64 << 10,   batch=64,   channels=16,  lr=0.0100, decay=1000,  dropout=0.00, P_mean=-0.8, P_std=1.6,
                                        channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, rampup=4 << 10,
                                        status=4 << 10, snapshot=16 << 10, checkpoint=16 << 10),
    'cpu-32':           dnnlib.EasyDict(duration=32 << 10,   batch=32,   channels=16,  lr=0.0100, decay=500,   dropout=0.00, P_mean=-0.8, P_std=1.6,
                                        channel_mult=[1, 2, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, rampup=2 << 10,
                                        status=2 << 10, snapshot=8 << 10, checkpoint=8 << 10),
}
# fmt: on

# Defaults of the options that a preset may also set.
_io_defaults = dict(status=128 << 10, snapshot=8 << 20, checkpoint=128 << 20)

# Network options that only the CPU presets set (the paper's presets keep the UNet defaults).
_ARCH_KEYS = ["channel_mult", "num_blocks", "attn_resolutions", "channels_per_head"]


def is_cpu_preset(name: str) -> bool:
    return name.startswith("cpu-")


def preset_network_kwargs(
    preset: str, channels: Optional[int] = None, dropout: Optional[float] = None, use_fp16: Optional[bool] = None
) -> dnnlib.EasyDict:
    """The ``network_kwargs`` that a preset trains (None = the preset's value; use_fp16 None = unset)."""
    p = config_presets[preset]
    kwargs = dnnlib.EasyDict(
        class_name="training.networks_edm2.Precond",
        model_channels=(p.channels if channels is None else channels),
        dropout=(p.dropout if dropout is None else dropout),
    )
    if use_fp16 is not None:
        kwargs.use_fp16 = use_fp16
    kwargs.update({key: copy.deepcopy(p[key]) for key in _ARCH_KEYS if key in p})
    return kwargs


# ----------------------------------------------------------------------------
# Resolving the configuration.


def parse_nimg(s: Any) -> int:
    """An image count: an integer, optionally with the binary suffix Ki, Mi or Gi (2^10, 2^20, 2^30)."""
    if isinstance(s, int):
        return s
    match = re.fullmatch(r"\s*(\d+)\s*(Ki|Mi|Gi)?\s*", str(s))
    if match is None:
        raise ValueError(f'"{s}" is not an image count (an integer, optionally followed by Ki, Mi or Gi)')
    shift = {None: 0, "Ki": 10, "Mi": 20, "Gi": 30}[match.group(2)]
    return int(match.group(1)) << shift


class NimgParamType(click.ParamType):
    name = "nimg"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        try:
            return parse_nimg(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _open_dataset(dataset_kwargs: dict) -> Any:
    try:
        return dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"--data: {dnnlib.util.one_line(err)}") from None


def _resolve_precision(precision: Optional[str], fp16: Optional[bool], tf32: bool) -> tuple[str, bool]:
    """The precision of the run on this device and network_kwargs.use_fp16 (None = unset option)."""
    if precision is not None and fp16 is not None and fp16 != (precision == "fp16"):
        raise ValueError(f"--precision={precision} contradicts --fp16={fp16}")
    use_fp16 = fp16 if fp16 is not None else precision in (None, "fp16")
    try:
        return misc.resolve_precision(precision, use_fp16, misc.default_device(), tf32), use_fp16
    except ValueError as err:
        raise ValueError(f"--{'precision' if precision not in (None, 'fp32') else 'tf32'}: {err}") from None


def setup_training_config(preset: str = "edm2-img512-s", world_size: int = 1, **opts: Any) -> dnnlib.EasyDict:
    """Resolve a preset and option overrides (None = take the preset's value) into the keyword
    arguments of ``training_loop``. Raises ValueError, naming the option, for bad input."""
    if preset not in config_presets:
        raise ValueError(f'--preset: unknown preset "{preset}"; choose from {", ".join(config_presets)}')
    opts = dnnlib.EasyDict({key: value for key, value in opts.items() if value is not None})
    opts = dnnlib.EasyDict({**_io_defaults, **copy.deepcopy(config_presets[preset]), **opts})  # explicit options win
    if opts.channels < 64 and not is_cpu_preset(preset):
        raise ValueError(f"--channels: {opts.channels} is below 64, which only the CPU presets (cpu-*) allow")
    precision, use_fp16 = _resolve_precision(opts.get("precision"), opts.get("fp16"), opts.get("tf32", False))

    # Dataset and encoder: 3 channels are RGB pixels, 8 are the mean and std of Stable Diffusion VAE latents.
    if opts.get("data") is None:
        raise ValueError("--data: missing dataset path")
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(
        class_name="training.dataset.ImageFolderDataset", path=opts.data, use_labels=opts.get("cond", True)
    )
    dataset_obj = _open_dataset(c.dataset_kwargs)
    if c.dataset_kwargs.use_labels and not dataset_obj.has_labels:
        raise ValueError(f"--cond=True, but the dataset {opts.data} has no labels (use --cond=False)")
    encoders = {3: "training.encoders.StandardRGBEncoder", 8: "training.encoders.StabilityVAEEncoder"}
    if dataset_obj.num_channels not in encoders:
        raise ValueError(
            f"--data: unsupported channel count {dataset_obj.num_channels} (expected 3 for RGB or 8 for VAE latents)"
        )
    c.encoder_kwargs = dnnlib.EasyDict(class_name=encoders[dataset_obj.num_channels])
    del dataset_obj  # conserve memory

    # Hyperparameters; performance- and I/O-related options (the reference's key order).
    c.update(total_nimg=opts.duration, batch_size=opts.batch)
    c.network_kwargs = preset_network_kwargs(preset, channels=opts.channels, dropout=opts.dropout, use_fp16=use_fp16)
    c.loss_kwargs = dnnlib.EasyDict(class_name="training.training_loop.EDM2Loss", P_mean=opts.P_mean, P_std=opts.P_std)
    c.lr_kwargs = dnnlib.EasyDict(
        func_name="training.training_loop.learning_rate_schedule", ref_lr=opts.lr, ref_batches=opts.decay
    )
    if "rampup" in opts:  # only the CPU presets set the ramp-up
        c.lr_kwargs.rampup_Mimg = opts.rampup / 1e6
    c.update(
        batch_gpu=(opts.get("batch_gpu", 0) or None),
        loss_scaling=opts.get("ls", 1),
        cudnn_benchmark=opts.get("bench", True),
    )
    c.update(
        status_nimg=(opts.status or None),
        snapshot_nimg=(opts.snapshot or None),
        checkpoint_nimg=(opts.checkpoint or None),
    )
    c.seed = opts.get("seed", 0)
    c.update(precision=precision, tf32=opts.get("tf32", False))  # not in the reference's options
    c.compile = bool(opts.get("compile", False))
    training_loop.check_training_config(
        batch_size=c.batch_size,
        world_size=world_size,
        batch_gpu=c.batch_gpu,
        total_nimg=c.total_nimg,
        status_nimg=c.status_nimg,
        snapshot_nimg=c.snapshot_nimg,
        checkpoint_nimg=c.checkpoint_nimg,
    )
    return c


# ----------------------------------------------------------------------------
# The run directory: created with training_options.json and dataset_identity.json; resumed when the
# options that change the math of the run are the same.

# Options that only change how a run goes (not its math), with the command-line option that sets them.
RUNTIME_OPTIONS = {
    "total_nimg": "--duration",
    "batch_gpu": "--batch-gpu",
    "status_nimg": "--status",
    "snapshot_nimg": "--snapshot",
    "checkpoint_nimg": "--checkpoint",
    "cudnn_benchmark": "--bench",
    "tf32": "--tf32",  # rounds float32 matmuls, like a cuDNN algorithm choice: not the recipe
    "compile": "--compile",
    "dataset_kwargs.path": "--data",
}

# The command-line option behind each option that must match (others come from --preset).
_MATH_OPTIONS = {
    "batch_size": "--batch",
    "network_kwargs.model_channels": "--channels",
    "network_kwargs.dropout": "--dropout",
    "network_kwargs.use_fp16": "--fp16",
    "precision": "--precision",
    "loss_kwargs.P_mean": "--P_mean",
    "loss_kwargs.P_std": "--P_std",
    "lr_kwargs.ref_lr": "--lr",
    "lr_kwargs.ref_batches": "--decay",
    "loss_scaling": "--ls",
    "seed": "--seed",
    "dataset_kwargs.use_labels": "--cond",
    "encoder_kwargs.class_name": "--data",
    "dataset": "--data",
}


def dataset_identity(dataset_kwargs: dict) -> dict:
    """What identifies a dataset's content for training, wherever it lies: the image count, the
    image shape, and a hash of the labels (when they are used)."""
    dataset_obj = _open_dataset(dataset_kwargs)
    labels = (
        np.ascontiguousarray(dataset_obj._get_raw_labels()[dataset_obj._raw_idx]) if dataset_obj.has_labels else None
    )
    return dict(
        num_images=len(dataset_obj),
        image_shape=list(dataset_obj.image_shape),
        labels_sha256=(hashlib.sha256(labels.tobytes()).hexdigest() if labels is not None else None),
    )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        return {prefix: obj}
    items = {}
    for key, value in obj.items():
        items.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return items


def diff_training_options(stored: dict, current: dict) -> dict[str, tuple]:
    """``{option: (stored, current)}`` for every option whose value differs (compared as JSON)."""
    a, b = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(current)))
    return {
        key: (a.get(key, "(unset)"), b.get(key, "(unset)"))
        for key in list(a) + [k for k in b if k not in a]
        if key not in a or key not in b or a[key] != b[key]
    }


def _describe(key: str, values: tuple) -> str:
    return f"{key} {json.dumps(values[0])} -> {json.dumps(values[1])}"


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--outdir: cannot read {path}: {dnnlib.util.one_line(err)}") from None


def check_run_dir(run_dir: str, c: dict) -> dict[str, tuple]:
    """Compare ``c`` with the options an existing run directory was created with.

    Raises ValueError naming every option that changes the math of the run; returns the changed
    run-time options ``{option: (stored, current)}`` (empty for a new run directory).
    """
    stored = _read_json(os.path.join(run_dir, "training_options.json"))
    if stored is None:
        return {}
    if "precision" not in stored:  # a run of the reference (or from before --precision): fp16 as use_fp16 says
        stored["precision"] = misc.resolve_precision(
            None, stored["network_kwargs"].get("use_fp16", True), misc.default_device()
        )
    stored.setdefault("tf32", False)
    changes = diff_training_options(stored, c)
    if "dataset_kwargs.path" in changes:  # a moved or another dataset: compare the content
        stored_identity = _read_json(os.path.join(run_dir, "dataset_identity.json"))
        if stored_identity is None and os.path.exists(stored["dataset_kwargs"]["path"]):  # a run of the reference
            stored_identity = dataset_identity(stored["dataset_kwargs"])
        current_identity = dataset_identity(c["dataset_kwargs"])
        if stored_identity is not None and stored_identity != current_identity:
            changes["dataset"] = (stored_identity, current_identity)
    math = [
        f"{_MATH_OPTIONS.get(key, '--preset')}: {_describe(key, values)}"
        for key, values in changes.items()
        if key not in RUNTIME_OPTIONS
    ]
    if math:
        raise ValueError(
            f"--outdir: {run_dir} holds a run with different options ({'; '.join(math)}); "
            f"rerun with the same options to resume, or choose another --outdir"
        )
    return changes


def print_training_config(run_dir: str, c: dict, preset: str) -> None:
    dist.print0()
    dist.print0("Training config:")
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f"Preset:                  {preset}")
    dist.print0(f"Output directory:        {run_dir}")
    dist.print0(f"Dataset path:            {c['dataset_kwargs']['path']}")
    dist.print0(f"Class-conditional:       {c['dataset_kwargs']['use_labels']}")
    dist.print0(f"Number of processes:     {dist.get_world_size()}")
    dist.print0(f"Device:                  {'cuda' if torch.cuda.is_available() else 'cpu'}")
    dist.print0(f"Batch size:              {c['batch_size']}")
    dist.print0(f"Precision:               {c['precision']}{' with TF32' if c['tf32'] else ''}")
    dist.print0()


def setup_monitor_kwargs(
    preset: str,
    tensorboard: bool = True,
    grid: Optional[int] = None,
    metrics: Optional[str] = None,
    metrics_images: int = 50000,
    metrics_ref: Optional[str] = None,
) -> dnnlib.EasyDict:
    """Keyword arguments of ``training.monitoring.TrainingMonitor`` (kept out of training_options.json,
    so that watching a run differently never blocks its resumption). Raises ValueError."""
    m = dnnlib.EasyDict(class_name="training.monitoring.TrainingMonitor", tensorboard=tensorboard)
    m.grid = grid if grid is not None else (_cpu_grid if is_cpu_preset(preset) else 64)
    m.metrics = []
    if metrics:
        from training.metrics import parse_metric_list  # lazily: only runs with metrics need it

        try:
            m.metrics = parse_metric_list(metrics)
        except ValueError as err:
            raise ValueError(f"--metrics: {err}") from None
        if metrics_ref is None:
            raise ValueError("--metrics needs --metrics-ref (reference statistics, e.g. from calculate_metrics.py ref)")
        if "://" not in metrics_ref and not os.path.isfile(metrics_ref):
            raise ValueError(f"--metrics-ref: {metrics_ref} is not a file")
        m.update(metrics_images=metrics_images, metrics_ref=metrics_ref)
    return m


_cpu_grid = 40  # cpu-* presets: at most 10 classes x 4 seeds (the budget may draw fewer columns)


def _create_run_dir(run_dir: str, c: dict) -> None:
    dist.print0("Creating output directory...")
    with dnnlib.util.atomic_write(os.path.join(run_dir, "training_options.json"), "w") as f:
        json.dump(c, f, indent=2)
    with dnnlib.util.atomic_write(os.path.join(run_dir, "dataset_identity.json"), "w") as f:
        json.dump(dataset_identity(c["dataset_kwargs"]), f, indent=2)


def _record_runtime_changes(run_dir: str, changes: dict[str, tuple]) -> None:
    """Print the changed run-time options and append them to training_options-resume.jsonl."""
    dist.print0(
        "Resuming with changed run-time options: "
        + "; ".join(_describe(key, values) for key, values in changes.items())
    )
    record = dict(
        timestamp=time.time(), num_processes=dist.get_world_size(), changed={key: list(v) for key, v in changes.items()}
    )
    with open(os.path.join(run_dir, "training_options-resume.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def launch_training(run_dir: str, c: dict, preset: Optional[str] = None, monitor_kwargs: Optional[dict] = None) -> None:
    """Create the run directory or check that the existing one is a run of the same math, then
    train with everything printed also appended to log.txt."""
    changes = check_run_dir(run_dir, c)  # every rank, before any collective, so that all of them fail alike
    is_new = not os.path.isfile(os.path.join(run_dir, "training_options.json"))
    if dist.get_rank() == 0 and is_new:
        _create_run_dir(run_dir, c)
    dist.barrier()

    logger = (
        dnnlib.util.Logger(file_name=os.path.join(run_dir, "log.txt"), file_mode="a", should_flush=True)
        if dist.get_rank() == 0
        else None
    )
    try:
        if dist.get_rank() == 0 and changes:
            _record_runtime_changes(run_dir, changes)
        training_loop.training_loop(run_dir=run_dir, preset_name=preset, monitor_kwargs=monitor_kwargs, **c)
    finally:
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------
# Command line.


@click.command(epilog="Presets: " + ", ".join(config_presets))
# Main options.
@click.option(
    "--outdir",
    help="Run directory (created, or resumed from its latest checkpoint)",
    metavar="DIR",
    required=True,
)
@click.option("--data", help="Path to the dataset", metavar="ZIP|DIR", required=True)
@click.option(
    "--cond", help="Train class-conditional model", metavar="BOOL", type=bool, default=True, show_default=True
)
@click.option(
    "--preset", help="Configuration preset", metavar="STR", type=str, default="edm2-img512-s", show_default=True
)
# Hyperparameters.
@click.option("--duration", help="Training duration", metavar="NIMG", type=NimgParamType())
@click.option("--batch", help="Total batch size", metavar="NIMG", type=NimgParamType())
@click.option(
    "--channels",
    help="Channel multiplier (>= 64 except for cpu-* presets)",
    metavar="INT",
    type=click.IntRange(min=1),
)
@click.option(
    "--dropout", help="Dropout probability", metavar="FLOAT", type=click.FloatRange(min=0, max=1), default=None
)
@click.option("--P_mean", "P_mean", help="Noise level mean", metavar="FLOAT", type=float)
@click.option(
    "--P_std",
    "P_std",
    help="Noise level standard deviation",
    metavar="FLOAT",
    type=click.FloatRange(min=0, min_open=True),
)
@click.option(
    "--lr",
    help="Learning rate max. (alpha_ref)",
    metavar="FLOAT",
    type=click.FloatRange(min=0, min_open=True),
)
@click.option(
    "--decay", help="Learning rate decay (t_ref)", metavar="BATCHES", type=click.FloatRange(min=0), default=None
)
# Performance-related options.
@click.option(
    "--batch-gpu",
    help="Limit batch size per process (0 = no limit)",
    metavar="NIMG",
    type=NimgParamType(),
    default=0,
    show_default=True,
)
@click.option(
    "--fp16",
    help="Enable mixed-precision training (CUDA only)  [default: True]",
    metavar="BOOL",
    type=bool,
)
@click.option(
    "--precision",
    help="fp32, fp16 (= --fp16=True) or bf16 (autocast); fp16 and bf16 need CUDA  [default: as --fp16]",
    metavar="NAME",
    type=click.Choice(misc.PRECISIONS),
)
@click.option("--tf32", help="Allow TF32 in float32 matmuls and convolutions (CUDA only)  [default: off]", is_flag=True)
@click.option(
    "--ls",
    help="Loss scaling",
    metavar="FLOAT",
    type=click.FloatRange(min=0, min_open=True),
    default=1,
    show_default=True,
)
@click.option("--bench", help="Enable cuDNN benchmarking", metavar="BOOL", type=bool, default=True, show_default=True)
@click.option(
    "--compile",
    help="Run the training network through torch.compile (off by default: compiling takes minutes, once per "
    "run; then 1.4x faster steps for a 1.8M-parameter network on a 2-core CPU)",
    is_flag=True,
)
# I/O-related options.
@click.option(
    "--status",
    help="Interval of status prints (0 = off)  [default: 128Ki; cpu-* presets: their own]",
    metavar="NIMG",
    type=NimgParamType(),
)
@click.option(
    "--snapshot",
    help="Interval of network snapshots (0 = off)  [default: 8Mi; cpu-* presets: their own]",
    metavar="NIMG",
    type=NimgParamType(),
)
@click.option(
    "--checkpoint",
    help="Interval of training checkpoints (0 = off)  [default: 128Mi; cpu-* presets: their own]",
    metavar="NIMG",
    type=NimgParamType(),
)
@click.option("--seed", help="Random seed", metavar="INT", type=int, default=0, show_default=True)
# Watching the run (see README "Watching a run").
@click.option(
    "--tensorboard/--no-tensorboard",
    help="Write TensorBoard event files into the run directory",
    default=True,
    show_default=True,
)
@click.option(
    "--grid",
    help="Images in the sample grid at each snapshot, at most (0 = off); none at kimg 0. Each grid may cost "
    "10% of the training time since the previous one (cost per image measured): the largest grid that fits "
    "(whole columns of classes), else none  [default: 64; cpu-* presets: 40]",
    metavar="INT",
    type=click.IntRange(min=0),
)
@click.option(
    "--metrics",
    help="Metrics at each snapshot, e.g. fid,fd_dinov2  [default: none]",
    metavar="LIST",
)
@click.option(
    "--metrics-images",
    help="Images generated for the metrics",
    metavar="INT",
    type=click.IntRange(min=2),
    default=50000,
    show_default=True,
)
@click.option(
    "--metrics-ref", help="Reference statistics for the metrics", metavar="PKL|NPZ|URL", type=str, default=None
)
@click.option("-n", "--dry-run", help="Print training options and exit", is_flag=True)
def cmdline(outdir: str, dry_run: bool, **opts: Any) -> None:
    """Train diffusion models according to the EDM2 recipe.

    Examples:

    \b
    # Train XS-sized model for ImageNet-512 using 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_edm2.py \\
        --outdir=training-runs/00000-edm2-img512-xs \\
        --data=datasets/img512-sd.zip \\
        --preset=edm2-img512-xs \\
        --batch-gpu=32

    \b
    # Train a small class-conditional model on a CPU in minutes
    python train_edm2.py --outdir=training-runs/digits --data=datasets/digits16.zip --preset=cpu-16

    \b
    # To resume training, run the same command again.
    """
    if torch.cuda.is_available():
        torch.multiprocessing.set_start_method("spawn", force=True)
    if dist.is_distributed():
        dist.init()  # under torchrun: know the ranks before printing or validating anything
    try:
        dist.print0("Setting up training config...")
        monitor_opts = {
            key: opts.pop(key) for key in ["tensorboard", "grid", "metrics", "metrics_images", "metrics_ref"]
        }
        c = setup_training_config(world_size=dist.get_world_size(), **opts)
        monitor_kwargs = setup_monitor_kwargs(preset=opts["preset"], **monitor_opts)
        print_training_config(run_dir=outdir, c=c, preset=opts["preset"])
        if dry_run:
            try:
                changes = check_run_dir(outdir, c)
                if changes:
                    dist.print0(
                        "Note: changed run-time options: "
                        + "; ".join(_describe(key, values) for key, values in changes.items())
                    )
            except ValueError as err:
                dist.print0(f"Note: {err}")
            dist.print0("Dry run; exiting.")
            return
        check_run_dir(outdir, c)  # before the process group of a single process
        dist.init()  # a single process gets a process group of one
        launch_training(run_dir=outdir, c=c, preset=opts["preset"], monitor_kwargs=monitor_kwargs)
    except (ValueError, OSError) as err:
        raise click.ClickException(dnnlib.util.one_line(err)) from None


# ----------------------------------------------------------------------------


if __name__ == "__main__":
    cmdline()

# ----------------------------------------------------------------------------
