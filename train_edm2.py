"""Train EDM2 diffusion models: resolve a preset plus command-line overrides into a training
configuration, create or resume the run directory, and call the training loop.

Runs as one process (``python train_edm2.py ...``) or as several under ``torchrun``; uses CUDA when
available, else the CPU (where float16 is never used). Besides the paper's twelve presets there are
CPU-scale presets (``cpu-16``, ``cpu-32``) for training small class-conditional models on small
datasets in minutes.

Resuming: rerunning the command continues from the latest checkpoint. Every option must equal the
one in ``training_options.json`` (kept as written at creation), except the run-time options listed
in ``RUNTIME_OPTIONS``, which only change how the run goes: their changes are printed into
``log.txt``. ``--data`` may point elsewhere while the content recorded in ``dataset_identity.json``
stays the same. A refusal names each differing key path with both values.
"""

import copy
import hashlib
import json
import os
import re
import warnings
from typing import Any, Optional

import click
import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, persistence
from training import cli, training_loop
from training.presets import (  # noqa: F401 -- config_presets: the reference's train_edm2.config_presets
    config_presets,
    io_defaults,
    is_cpu_preset,
    preset_network_kwargs,
)

warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")  # DDP on channels-last grads

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


def _open_dataset(dataset_kwargs: dict) -> Any:
    try:
        return dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"--data: {dnnlib.util.one_line(err)}") from None


def precision_of_fp16(precision: Optional[str], fp16: Optional[bool]) -> Optional[str]:
    """``--fp16`` (the reference's option) as the alias it is: True = ``--precision=fp16``, False = fp32."""
    if fp16 is None:
        return precision
    if precision not in (None, "fp16" if fp16 else "fp32"):
        raise ValueError(f"--precision={precision} contradicts --fp16={fp16}")
    return "fp16" if fp16 else "fp32"


def dataset_encoder_kwargs(dataset_obj: Any) -> dnnlib.EasyDict:
    """The encoder that a dataset's items need: RGB pixels (3 channels), or VAE latents with the VAE and
    latent statistics that ``dataset_tool.py encode`` stored in dataset.json. Latents without them (the
    reference's 8-channel datasets) get the encoder's defaults, Stable Diffusion's VAE on ImageNet-512."""
    num_channels = dataset_obj.num_channels
    try:
        vae = dataset_obj.load_dataset_json().get("vae")
    except OSError as err:
        raise ValueError(f"--data: {dnnlib.util.one_line(err)}") from None
    if vae is None:
        encoders = {3: "training.encoders.StandardRGBEncoder", 8: "training.encoders.StabilityVAEEncoder"}
        if num_channels not in encoders:
            raise ValueError(
                f"--data: unsupported channel count {num_channels} (expected 3 for RGB or 8 for VAE latents)"
            )
        return dnnlib.EasyDict(class_name=encoders[num_channels])
    try:
        name, channels = str(vae["name"]), int(vae["latent_channels"])
        raw_mean, raw_std = [float(x) for x in vae["raw_mean"]], [float(x) for x in vae["raw_std"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--data: malformed 'vae' entry in dataset.json ({dnnlib.util.one_line(err)})") from None
    if not (2 * channels == num_channels == 2 * len(raw_mean) == 2 * len(raw_std)) or min(raw_std) <= 0:
        raise ValueError(
            f"--data: dataset.json describes {channels} latent channels with {len(raw_mean)} means and "
            f"{len(raw_std)} positive standard deviations, but the items have {num_channels} channels (mean and std)"
        )
    return dnnlib.EasyDict(
        class_name="training.encoders.StabilityVAEEncoder", vae_name=name, raw_mean=raw_mean, raw_std=raw_std
    )


_INTERFACE_KEYS = ("img_resolution", "img_channels", "label_dim")  # set by the dataset, in training_loop


def init_network_kwargs(
    init: str, dataset_obj: Any, use_labels: bool, use_fp16: bool, dropout: Optional[float] = None
) -> dnnlib.EasyDict:
    """The ``network_kwargs`` of a run that starts from the network pickle ``init``: the construction
    arguments of its ``ema``, with this run's precision (and ``dropout`` if given: it adds no weights).
    Refuses a dataset that does not fit the network."""
    try:
        net = persistence.load_network_pickle(init, verbose=False)["ema"]
    except persistence.NetworkPickleError as err:
        raise ValueError(f"--init: {err}") from None
    name = type(net).__name__
    if persistence.SAFE_PERSISTENT_CLASSES.get(name) != "training.networks_edm2" or not hasattr(net, "init_kwargs"):
        raise ValueError(f"--init: the pickle's ema is a {name}, not an EDM2 network")
    if len(net.init_args) != 0:
        raise ValueError(
            f"--init: the pickle's {name} was constructed with positional arguments, which are not supported"
        )
    kwargs = net.init_kwargs
    channels = dataset_obj.num_channels if dataset_obj.num_channels == 3 else dataset_obj.num_channels // 2
    wanted = dict(img_resolution=dataset_obj.resolution, img_channels=channels)
    wanted["label_dim"] = dataset_obj.label_dim if use_labels else 0
    differ = [f"{key} {kwargs.get(key)} in the network, {value} in the dataset" for key, value in wanted.items()
              if kwargs.get(key) != value]  # fmt: skip
    if differ:
        raise ValueError(f"--data does not fit the --init network: {'; '.join(differ)}")
    network_kwargs = dnnlib.EasyDict(class_name=f"training.networks_edm2.{name}")
    network_kwargs.update({key: value for key, value in kwargs.items() if key not in _INTERFACE_KEYS})
    network_kwargs.use_fp16 = use_fp16
    if dropout is not None:
        network_kwargs.dropout = dropout
    return network_kwargs


def setup_training_config(preset: str = "edm2-img512-s", world_size: int = 1, **opts: Any) -> dnnlib.EasyDict:
    """Resolve a preset and option overrides (None = take the preset's value) into the keyword
    arguments of ``training_loop``. Raises ValueError, naming the option, for bad input."""
    if preset not in config_presets:
        raise ValueError(f'--preset: unknown preset "{preset}"; choose from {", ".join(config_presets)}')
    opts = dnnlib.EasyDict({key: value for key, value in opts.items() if value is not None})
    if "init" in opts and "channels" in opts:  # the one option that would change the architecture
        raise ValueError("--channels: the architecture comes from --init; leave out --channels")
    explicit_dropout = opts.get("dropout")
    opts = dnnlib.EasyDict({**io_defaults, **copy.deepcopy(config_presets[preset]), **opts})  # explicit options win
    if opts.channels < 64 and not is_cpu_preset(preset):
        raise ValueError(f"--channels: {opts.channels} is below 64, which only the CPU presets (cpu-*) allow")
    precision = precision_of_fp16(opts.get("precision"), opts.get("fp16"))
    use_fp16 = precision in (None, "fp16")  # None: the reference's default, float16 wherever it runs (CUDA)
    try:
        precision = misc.resolve_precision(precision, use_fp16, misc.default_device(), opts.get("tf32", False))
    except ValueError as err:
        raise ValueError(f"--{'precision' if precision not in (None, 'fp32') else 'tf32'}: {err}") from None

    # Dataset and encoder: 3 channels are RGB pixels, else the mean and std of VAE latents.
    if opts.get("data") is None:
        raise ValueError("--data: missing dataset path")
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(
        class_name="training.dataset.ImageFolderDataset", path=opts.data, use_labels=opts.get("cond", True)
    )
    dataset_obj = _open_dataset(c.dataset_kwargs)
    if c.dataset_kwargs.use_labels and not dataset_obj.has_labels:
        raise ValueError(f"--cond=True, but the dataset {opts.data} has no labels (use --cond=False)")
    c.encoder_kwargs = dataset_encoder_kwargs(dataset_obj)

    # Hyperparameters; performance- and I/O-related options (the reference's key order).
    c.update(total_nimg=opts.duration, batch_size=opts.batch)
    if opts.get("init") is not None:
        c.network_kwargs = init_network_kwargs(
            opts.init, dataset_obj, c.dataset_kwargs.use_labels, use_fp16, dropout=explicit_dropout
        )
    else:
        c.network_kwargs = preset_network_kwargs(
            preset, channels=opts.channels, dropout=opts.dropout, use_fp16=use_fp16
        )
    c.loss_kwargs = dnnlib.EasyDict(class_name="training.training_loop.EDM2Loss", P_mean=opts.P_mean, P_std=opts.P_std)
    c.lr_kwargs = dnnlib.EasyDict(
        func_name="training.training_loop.learning_rate_schedule", ref_lr=opts.lr, ref_batches=opts.decay
    )
    del dataset_obj  # conserve memory
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
    if opts.get("init") is not None:
        c.init = opts.init  # the initial weights (training_loop's init); a checkpoint, once there, wins
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
# The run directory: created with training_options.json (kept as written) and dataset_identity.json;
# resumed when every option other than the run-time options below is the same.

# Key paths of the options that may change between invocations of the same run: they change how it
# runs, not its math.
RUNTIME_OPTIONS = [
    "total_nimg",
    "batch_gpu",
    "status_nimg",
    "snapshot_nimg",
    "checkpoint_nimg",
    "cudnn_benchmark",
    "tf32",  # rounds float32 matmuls, like a cuDNN algorithm choice: not the recipe
    "compile",
    "dataset_kwargs.path",  # a moved dataset, as long as dataset_identity is the same
]


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


def diff_options(old: Any, new: Any, key_path: str = "") -> dict[str, tuple]:
    """``{key path: (old, new)}`` for every leaf where two nested dicts differ (a missing key is None)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return {} if old == new else {key_path: (old, new)}
    keys = list(old) + [key for key in new if key not in old]
    return {
        path: values
        for key in keys
        for path, values in diff_options(old.get(key), new.get(key), f"{key_path}.{key}" if key_path else key).items()
    }


def _describe(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{key}: {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items())


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

    Raises ValueError naming the key path and both values of every option that changes the math of
    the run; returns the changed run-time options ``{key path: (stored, current)}`` (empty for a new
    run directory).
    """
    stored = _read_json(os.path.join(run_dir, "training_options.json"))
    if stored is None:
        return {}
    if "precision" not in stored:  # a run of the reference (or from before --precision): fp16 as use_fp16 says
        stored["precision"] = misc.resolve_precision(
            None, stored["network_kwargs"].get("use_fp16", True), misc.default_device()
        )
    stored.setdefault("tf32", False)  # nor does the reference write these
    stored.setdefault("compile", False)
    current = dict(c)
    if stored["dataset_kwargs"]["path"] != c["dataset_kwargs"]["path"]:  # a moved or another dataset: its content
        old_identity = _read_json(os.path.join(run_dir, "dataset_identity.json"))
        if old_identity is None and os.path.exists(stored["dataset_kwargs"]["path"]):  # a run of the reference
            old_identity = dataset_identity(stored["dataset_kwargs"])
        if old_identity is not None:  # else a reference run whose dataset moved: nothing to compare with
            stored["dataset_identity"] = old_identity
            current["dataset_identity"] = dataset_identity(c["dataset_kwargs"])
    changes = diff_options(stored, current)
    math = {key: values for key, values in changes.items() if key not in RUNTIME_OPTIONS}
    if math:
        raise ValueError(
            f"--outdir: {run_dir} holds a run with different options ({_describe(math)}); "
            f"rerun with the options of its training_options.json to resume, or choose another --outdir"
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
    grid_at_start: bool = False,
    metrics: Optional[str] = None,
    metrics_images: int = 50000,
    metrics_ref: Optional[str] = None,
) -> dnnlib.EasyDict:
    """Keyword arguments of ``training.monitoring.TrainingMonitor`` (kept out of training_options.json,
    so that watching a run differently never blocks its resumption). Raises ValueError."""
    m = dnnlib.EasyDict(class_name="training.monitoring.TrainingMonitor", tensorboard=tensorboard)
    m.grid = grid if grid is not None else (_cpu_grid if is_cpu_preset(preset) else 64)
    m.grid_at_start = bool(grid_at_start)
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
        if changes:  # into log.txt, the record of every invocation
            n = dist.get_world_size()
            dist.print0(
                f"Resuming on {n} process{'es' if n > 1 else ''} with changed run-time options: {_describe(changes)}"
            )
        training_loop.training_loop(run_dir=run_dir, preset_name=preset, monitor_kwargs=monitor_kwargs, **c)
    finally:
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------
# Command line.


# fmt: off
@click.command(epilog="Presets: " + ", ".join(config_presets))
# Main options.
@click.option("--outdir", help="Run directory (created, or resumed from its latest checkpoint)", metavar="DIR", required=True)
@click.option("--data", help="Path to the dataset", metavar="ZIP|DIR", required=True)
@click.option("--init", help="Fine-tune: start from this network pickle's ema (its architecture and weights)", metavar="PKL|URL", type=str)
@click.option("--cond", help="Train class-conditional model", metavar="BOOL", type=bool, default=True, show_default=True)
@click.option("--preset", help="Configuration preset", metavar="STR", type=str, default="edm2-img512-s", show_default=True)
# Hyperparameters.
@click.option("--duration", help="Training duration", metavar="NIMG", type=cli.ParsedParam(parse_nimg, "nimg"))
@click.option("--batch", help="Total batch size", metavar="NIMG", type=cli.ParsedParam(parse_nimg, "nimg"))
@click.option("--channels", help="Channel multiplier (>= 64 except for cpu-* presets)", metavar="INT", type=click.IntRange(min=1))
@click.option("--dropout", help="Dropout probability", metavar="FLOAT", type=click.FloatRange(min=0, max=1), default=None)
@click.option("--P_mean", "P_mean", help="Noise level mean", metavar="FLOAT", type=float)
@click.option("--P_std", "P_std", help="Noise level standard deviation", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--lr", help="Learning rate max. (alpha_ref)", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--decay", help="Learning rate decay (t_ref)", metavar="BATCHES", type=click.FloatRange(min=0), default=None)
# Performance-related options.
@click.option("--batch-gpu", help="Limit batch size per process (0 = no limit)", metavar="NIMG", type=cli.ParsedParam(parse_nimg, "nimg"), default=0, show_default=True)
@click.option("--fp16", help="Enable mixed-precision training (CUDA only)  [default: True]", metavar="BOOL", type=bool)
@click.option("--precision", help="fp32, fp16 (= --fp16=True) or bf16 (autocast); fp16 and bf16 need CUDA  [default: as --fp16]", metavar="NAME", type=click.Choice(misc.PRECISIONS))
@click.option("--tf32", help="Allow TF32 in float32 matmuls and convolutions (CUDA only)  [default: off]", is_flag=True)
@click.option("--ls", help="Loss scaling", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option("--bench", help="Enable cuDNN benchmarking", metavar="BOOL", type=bool, default=True, show_default=True)
@click.option("--compile", help="Run the training network through torch.compile (off by default: compiling takes minutes, once per run; then faster steps, see docs/performance.md)", is_flag=True)
# I/O-related options.
@click.option("--status", help="Interval of status prints (0 = off)  [default: 128Ki; cpu-* presets: their own]", metavar="NIMG", type=cli.ParsedParam(parse_nimg, "nimg"))
@click.option("--snapshot", help="Interval of network snapshots (0 = off)  [default: 8Mi; cpu-* presets: their own]", metavar="NIMG", type=cli.ParsedParam(parse_nimg, "nimg"))
@click.option("--checkpoint", help="Interval of training checkpoints (0 = off)  [default: 128Mi; cpu-* presets: their own]", metavar="NIMG", type=cli.ParsedParam(parse_nimg, "nimg"))
@click.option("--seed", help="Random seed", metavar="INT", type=int, default=0, show_default=True)
# Watching the run (see README "Watching a run").
@click.option("--tensorboard/--no-tensorboard", help="Write TensorBoard event files into the run directory", default=True, show_default=True)
@click.option("--grid", help="Images in the sample grid at each snapshot, at most (0 = off); none at kimg 0. Each grid may cost 8% of the training time since the previous one (cost per image measured; CPU time on a CPU): the largest grid that fits (whole columns of classes), else none  [default: 64; cpu-* presets: 40]", metavar="INT", type=click.IntRange(min=0))
@click.option("--grid-at-start", help="Also a full grid of the untrained network at kimg 0", is_flag=True)
@click.option("--metrics", help="Metrics at each snapshot, e.g. fid,fd_dinov2  [default: none]", metavar="LIST")
@click.option("--metrics-images", help="Images generated for the metrics", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--metrics-ref", help="Reference statistics for the metrics", metavar="PKL|NPZ|URL", type=str, default=None)
@click.option("-n", "--dry-run", help="Print training options and exit", is_flag=True)
# fmt: on
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
    with cli.one_line_errors():
        dist.print0("Setting up training config...")
        monitor_opts = {
            key: opts.pop(key) for key in ["tensorboard", "grid", "grid_at_start", "metrics", "metrics_images", "metrics_ref"]
        }
        c = setup_training_config(world_size=dist.get_world_size(), **opts)
        monitor_kwargs = setup_monitor_kwargs(preset=opts["preset"], **monitor_opts)
        print_training_config(run_dir=outdir, c=c, preset=opts["preset"])
        if dry_run:
            try:
                changes = check_run_dir(outdir, c)
                if changes:
                    dist.print0(f"Note: changed run-time options: {_describe(changes)}")
            except ValueError as err:
                dist.print0(f"Note: {err}")
            dist.print0("Dry run; exiting.")
            return
        check_run_dir(outdir, c)  # before the process group of a single process
        dist.init()  # a single process gets a process group of one
        launch_training(run_dir=outdir, c=c, preset=opts["preset"], monitor_kwargs=monitor_kwargs)


# ----------------------------------------------------------------------------


if __name__ == "__main__":
    cmdline()

# ----------------------------------------------------------------------------
