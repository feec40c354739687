"""Train EDM2 diffusion models (spec §4.5): resolve a preset plus command-line overrides into a
training configuration, create or resume the run directory, and call the training loop.

Runs as one process (``python train_edm2.py ...``) or as several under ``torchrun``; uses CUDA when
available, else the CPU (where float16 is never used). Besides the paper's twelve presets there are
CPU-scale presets (``cpu-16``, ``cpu-32``) for training small class-conditional models on small
datasets in minutes.
"""

import copy
import json
import os
import re
import warnings
from typing import Any, Dict, List, Optional

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import training_loop

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')  # DDP on channels-last grads

# ----------------------------------------------------------------------------
# Configuration presets.
#
# The paper's presets (spec §4.5) set the duration, batch, model width, learning rate and decay,
# dropout and the noise distribution; the network keeps the spec §3.5 architecture
# (channel_mult [1,2,3,4], num_blocks 3, attention at 16x16 and 8x8).
#
# The CPU presets go further, because the paper's recipe does not scale down by width alone
# (a 64-channel XXS model still has 31M parameters and takes ~11 Gflops per 64x64 sample):
# - network: model_channels 16 and three or four levels with one block each, attention only at the
#   lowest resolution (4x4) with 16 channels per head (the default 64 would leave 32-channel blocks
#   without any head): about 0.3M parameters, so a step of 64 images at 16x16 takes a fraction of
#   a second on two CPU cores;
# - noise: P_mean -0.8 / P_std 1.6 (the pixel-space ImageNet-64 values): with small batches the
#   narrower -0.4 / 1.0 rarely draws the high noise levels that sampling starts from (spec §13);
# - duration: 64Ki images of 16x16 (1,024 steps of 64) or 32Ki of 32x32 (1,024 steps of 32), a few
#   minutes on two cores; scikit-learn's digits give recognisable samples of (nearly) every class
#   after ~32Ki images at either resolution;
# - schedule: lr 0.01 with the inverse-square-root decay starting after 1,000 (cpu-32: 500)
#   iterations instead of 70,000 or 35,000, and a linear ramp-up over the first 4Ki (2Ki) images
#   instead of 10M;
# - I/O: status every 4Ki (2Ki) images, snapshots and checkpoints every 16Ki (8Ki), instead of
#   128Ki/8Mi/128Mi.

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

# Defaults of the options that a preset may also set.
_io_defaults = dict(status=128 << 10, snapshot=8 << 20, checkpoint=128 << 20)


def is_cpu_preset(name: str) -> bool:
    return name.startswith('cpu-')

# ----------------------------------------------------------------------------
# Resolving the configuration.


def parse_nimg(s: Any) -> int:
    """An image count: an integer, optionally with the binary suffix Ki, Mi or Gi (2^10, 2^20, 2^30)."""
    if isinstance(s, int):
        return s
    match = re.fullmatch(r'\s*(\d+)\s*(Ki|Mi|Gi)?\s*', str(s))
    if match is None:
        raise ValueError(f'"{s}" is not an image count (an integer, optionally followed by Ki, Mi or Gi)')
    shift = {None: 0, 'Ki': 10, 'Mi': 20, 'Gi': 30}[match.group(2)]
    return int(match.group(1)) << shift


class NimgParamType(click.ParamType):
    name = 'nimg'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        try:
            return parse_nimg(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def setup_training_config(preset: str = 'edm2-img512-s', world_size: int = 1, **opts: Any) -> dnnlib.EasyDict:
    """Resolve a preset and option overrides (None = take the preset's value) into the keyword
    arguments of ``training_loop``. Raises click.ClickException for bad input."""
    opts = dnnlib.EasyDict(opts)
    c = dnnlib.EasyDict()

    # Preset; explicit options win.
    if preset not in config_presets:
        raise click.ClickException(f'--preset: unknown preset "{preset}"; choose from {", ".join(config_presets)}')
    for key, value in config_presets[preset].items():
        if opts.get(key) is None:
            opts[key] = copy.deepcopy(value)
    for key, value in _io_defaults.items():
        if opts.get(key) is None:
            opts[key] = value
    if opts.channels < 64 and not is_cpu_preset(preset):
        raise click.ClickException(f'--channels: {opts.channels} is below 64, which only the CPU presets (cpu-*) allow')

    # Dataset.
    if opts.get('data') is None:
        raise click.ClickException('--data: missing dataset path')
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.get('cond', True))
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
        dataset_channels = dataset_obj.num_channels
        has_labels = dataset_obj.has_labels
        del dataset_obj  # conserve memory
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data: {_one_line(err)}') from None
    if c.dataset_kwargs.use_labels and not has_labels:
        raise click.ClickException(f'--cond=True, but the dataset {opts.data} has no labels (use --cond=False)')

    # Encoder: 3 channels are RGB pixels, 8 are the mean and std of Stable Diffusion VAE latents.
    if dataset_channels == 3:
        c.encoder_kwargs = dnnlib.EasyDict(class_name='training.encoders.StandardRGBEncoder')
    elif dataset_channels == 8:
        c.encoder_kwargs = dnnlib.EasyDict(class_name='training.encoders.StabilityVAEEncoder')
    else:
        raise click.ClickException(f'--data: unsupported channel count {dataset_channels} (expected 3 for RGB or 8 for VAE latents)')

    # Hyperparameters.
    c.update(total_nimg=opts.duration, batch_size=opts.batch)
    c.network_kwargs = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', model_channels=opts.channels, dropout=opts.dropout)
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.training_loop.EDM2Loss', P_mean=opts.P_mean, P_std=opts.P_std)
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.training_loop.learning_rate_schedule', ref_lr=opts.lr, ref_batches=opts.decay)

    # Performance-related options.
    c.batch_gpu = opts.get('batch_gpu', 0) or None
    c.network_kwargs.use_fp16 = opts.get('fp16', True)
    c.loss_scaling = opts.get('ls', 1)
    c.cudnn_benchmark = opts.get('bench', True)

    # I/O-related options.
    c.status_nimg = opts.status or None
    c.snapshot_nimg = opts.snapshot or None
    c.checkpoint_nimg = opts.checkpoint or None
    c.seed = opts.get('seed', 0)

    # What only the CPU presets set: the network's shape and the learning-rate ramp-up.
    for key in ['channel_mult', 'num_blocks', 'attn_resolutions', 'channels_per_head']:
        if key in config_presets[preset]:
            c.network_kwargs[key] = opts[key]
    if 'rampup' in config_presets[preset]:
        c.lr_kwargs.rampup_Mimg = opts.rampup / 1e6

    # Batch layout and image counts.
    try:
        training_loop.check_training_config(batch_size=c.batch_size, world_size=world_size, batch_gpu=c.batch_gpu,
                                            total_nimg=c.total_nimg, status_nimg=c.status_nimg,
                                            snapshot_nimg=c.snapshot_nimg, checkpoint_nimg=c.checkpoint_nimg)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    return c


def _one_line(err: BaseException) -> str:
    return ' '.join(str(err).split()) or type(err).__name__

# ----------------------------------------------------------------------------
# The run directory.


def _flatten(obj: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(obj, dict):
        items = {}
        for key, value in obj.items():
            items.update(_flatten(value, f'{prefix}.{key}' if prefix else str(key)))
        return items
    return {prefix: obj}


def diff_training_options(stored: dict, current: dict) -> List[str]:
    """Describe every option whose value differs between two configurations (compared as JSON)."""
    a = _flatten(json.loads(json.dumps(stored)))
    b = _flatten(json.loads(json.dumps(current)))
    show = lambda d, key: json.dumps(d[key]) if key in d else '(unset)'
    keys = list(a) + [key for key in b if key not in a]
    return [f'{key} {show(a, key)} -> {show(b, key)}' for key in keys if key not in a or key not in b or a[key] != b[key]]


def check_run_dir(run_dir: str, c: dict) -> None:
    """Refuse to resume a run directory that was created with different options."""
    path = os.path.join(run_dir, 'training_options.json')
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--outdir: cannot read {path}: {_one_line(err)}') from None
    differences = diff_training_options(stored, c)
    if differences:
        raise click.ClickException(f'--outdir: {run_dir} holds a run with different options ({"; ".join(differences)}); '
                                   f'rerun with the same options to resume, or choose another --outdir')


def print_training_config(run_dir: str, c: dict, preset: str) -> None:
    dist.print0()
    dist.print0('Training config:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Preset:                  {preset}')
    dist.print0(f'Output directory:        {run_dir}')
    dist.print0(f'Dataset path:            {c["dataset_kwargs"]["path"]}')
    dist.print0(f'Class-conditional:       {c["dataset_kwargs"]["use_labels"]}')
    dist.print0(f'Number of processes:     {dist.get_world_size()}')
    dist.print0(f'Device:                  {"cuda" if torch.cuda.is_available() else "cpu"}')
    dist.print0(f'Batch size:              {c["batch_size"]}')
    dist.print0(f'Mixed-precision:         {c["network_kwargs"]["use_fp16"] and torch.cuda.is_available()}')
    dist.print0()


def setup_monitor_kwargs(preset: str, tensorboard: bool = True, grid: Optional[int] = None, metrics: Optional[str] = None,
                         metrics_images: int = 50000, metrics_ref: Optional[str] = None) -> dnnlib.EasyDict:
    """Keyword arguments of ``training.monitoring.TrainingMonitor`` (kept out of training_options.json,
    so that watching a run differently never blocks its resumption). Raises click.ClickException."""
    m = dnnlib.EasyDict(class_name='training.monitoring.TrainingMonitor', tensorboard=tensorboard)
    m.grid = grid if grid is not None else (_cpu_grid if is_cpu_preset(preset) else 64)
    m.metrics = []
    if metrics:
        import calculate_metrics  # lazily: only runs with metrics need it
        try:
            m.metrics = calculate_metrics.parse_metric_list(metrics)
        except ValueError as err:
            raise click.ClickException(f'--metrics: {err}') from None
        if metrics_ref is None:
            raise click.ClickException('--metrics needs --metrics-ref (reference statistics, e.g. from calculate_metrics.py ref)')
        if '://' not in metrics_ref and not os.path.isfile(metrics_ref):
            raise click.ClickException(f'--metrics-ref: {metrics_ref} is not a file')
        m.update(metrics_images=metrics_images, metrics_ref=metrics_ref)
    return m


_cpu_grid = 40  # cpu-* presets: 10 classes x 4 seeds, a few percent of a CPU run's time


def launch_training(run_dir: str, c: dict, preset: Optional[str] = None, monitor_kwargs: Optional[dict] = None) -> None:
    """Create the run directory (writing training_options.json) or check that an existing one was
    made with the same options, then train with everything printed also appended to log.txt."""
    check_run_dir(run_dir, c)  # every rank, before any collective, so that all of them fail alike
    options_path = os.path.join(run_dir, 'training_options.json')
    if dist.get_rank() == 0 and not os.path.isfile(options_path):
        dist.print0('Creating output directory...')
        os.makedirs(run_dir, exist_ok=True)
        tmp_path = options_path + '.tmp'
        with open(tmp_path, 'w') as f:
            json.dump(c, f, indent=2)
        os.replace(tmp_path, options_path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

    logger = dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True) if dist.get_rank() == 0 else None
    try:
        training_loop.training_loop(run_dir=run_dir, preset_name=preset, monitor_kwargs=monitor_kwargs, **c)
    finally:
        if logger is not None:
            logger.close()

# ----------------------------------------------------------------------------
# Command line.


@click.command(epilog='Presets: ' + ', '.join(config_presets))

# Main options.
@click.option('--outdir',           help='Run directory (created, or resumed from its latest checkpoint)', metavar='DIR', type=str, required=True)
@click.option('--data',             help='Path to the dataset', metavar='ZIP|DIR',              type=str, required=True)
@click.option('--cond',             help='Train class-conditional model', metavar='BOOL',      type=bool, default=True, show_default=True)
@click.option('--preset',           help='Configuration preset', metavar='STR',                 type=str, default='edm2-img512-s', show_default=True)

# Hyperparameters.
@click.option('--duration',         help='Training duration', metavar='NIMG',                   type=NimgParamType(), default=None)
@click.option('--batch',            help='Total batch size', metavar='NIMG',                    type=NimgParamType(), default=None)
@click.option('--channels',         help='Channel multiplier (>= 64 except for cpu-* presets)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--dropout',          help='Dropout probability', metavar='FLOAT',                type=click.FloatRange(min=0, max=1), default=None)
@click.option('--P_mean', 'P_mean', help='Noise level mean', metavar='FLOAT',                   type=float, default=None)
@click.option('--P_std', 'P_std',   help='Noise level standard deviation', metavar='FLOAT',     type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--lr',               help='Learning rate max. (alpha_ref)', metavar='FLOAT',     type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--decay',            help='Learning rate decay (t_ref)', metavar='BATCHES',      type=click.FloatRange(min=0), default=None)

# Performance-related options.
@click.option('--batch-gpu',        help='Limit batch size per process (0 = no limit)', metavar='NIMG', type=NimgParamType(), default=0, show_default=True)
@click.option('--fp16',             help='Enable mixed-precision training (CUDA only)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--ls',               help='Loss scaling', metavar='FLOAT',                       type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',            help='Enable cuDNN benchmarking', metavar='BOOL',           type=bool, default=True, show_default=True)

# I/O-related options.
@click.option('--status',           help='Interval of status prints (0 = off)  [default: 128Ki; cpu-* presets: their own]', metavar='NIMG', type=NimgParamType(), default=None)
@click.option('--snapshot',         help='Interval of network snapshots (0 = off)  [default: 8Mi; cpu-* presets: their own]', metavar='NIMG', type=NimgParamType(), default=None)
@click.option('--checkpoint',       help='Interval of training checkpoints (0 = off)  [default: 128Mi; cpu-* presets: their own]', metavar='NIMG', type=NimgParamType(), default=None)
@click.option('--seed',             help='Random seed', metavar='INT',                          type=int, default=0, show_default=True)

# Watching the run (see README "Watching a run").
@click.option('--tensorboard/--no-tensorboard', help='Write TensorBoard event files into the run directory', default=True, show_default=True)
@click.option('--grid',             help='Images in the sample grid at each snapshot (0 = off)  [default: 64; cpu-* presets: 40]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--metrics',          help='Metrics at each snapshot, e.g. fid,fd_dinov2  [default: none]', metavar='LIST', type=str, default=None)
@click.option('--metrics-images',   help='Images generated for the metrics', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--metrics-ref',      help='Reference statistics for the metrics', metavar='PKL|NPZ|URL', type=str, default=None)
@click.option('-n', '--dry-run',    help='Print training options and exit',                     is_flag=True)
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
        torch.multiprocessing.set_start_method('spawn', force=True)
    if dist.is_distributed():
        dist.init()  # under torchrun: know the ranks before printing or validating anything
    dist.print0('Setting up training config...')
    monitor_opts = {key: opts.pop(key) for key in ['tensorboard', 'grid', 'metrics', 'metrics_images', 'metrics_ref']}
    c = setup_training_config(world_size=dist.get_world_size(), **opts)
    monitor_kwargs = setup_monitor_kwargs(preset=opts['preset'], **monitor_opts)
    print_training_config(run_dir=outdir, c=c, preset=opts['preset'])
    if dry_run:
        try:
            check_run_dir(outdir, c)
        except click.ClickException as err:
            dist.print0(f'Note: {err.message}')
        dist.print0('Dry run; exiting.')
        return
    check_run_dir(outdir, c)
    dist.init()  # a single process gets a process group of one
    launch_training(run_dir=outdir, c=c, preset=opts['preset'], monitor_kwargs=monitor_kwargs)

# ----------------------------------------------------------------------------


if __name__ == '__main__':
    cmdline()

# ----------------------------------------------------------------------------
