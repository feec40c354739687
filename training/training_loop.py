"""The EDM2 training loop, its loss and its learning-rate schedule (Karras et al., "Analyzing and
Improving the Training Dynamics of Diffusion Models", CVPR 2024).

This module is embedded in every network snapshot (it defines the persistent ``EDM2Loss``) and the
reference tools execute it when they load one, against *their* ``dnnlib`` and ``torch_utils``. Its
module-level imports are therefore limited to the standard library, numpy, torch, psutil, dnnlib and
``torch_utils.{persistence, misc, distributed, training_stats}``; everything else (datasets,
encoders, the EMA, our newer helpers) is reached by name inside function bodies at run time.
"""

import copy
import os
import pickle
import sys
import time
from typing import Optional

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, persistence, training_stats

# ----------------------------------------------------------------------------
# Loss function: the EDM loss weighted by lambda(sigma) and by the learned uncertainty u(sigma)
# of the network's log-variance head (the paper's loss weighting with uncertainty).


@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        # sigma ~ LogNormal(P_mean, P_std), one per sample, drawn before the noise.
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        # (lambda / exp(u)) * (D - y)^2 + u, per element.
        loss = (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar
        return loss


# ----------------------------------------------------------------------------
# Learning-rate schedule: the paper's inverse square-root decay after ref_batches iterations, times
# a linear ramp-up over rampup_Mimg images.


def learning_rate_schedule(
    cur_nimg: int, batch_size: int, ref_lr: float = 100e-4, ref_batches: float = 70e3, rampup_Mimg: float = 10
) -> float:
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)


# ----------------------------------------------------------------------------
# Validation of the batch layout and the image counts.


def check_training_config(
    batch_size: int,
    world_size: int = 1,
    batch_gpu: Optional[int] = None,
    total_nimg: Optional[int] = None,
    slice_nimg: Optional[int] = None,
    status_nimg: Optional[int] = None,
    snapshot_nimg: Optional[int] = None,
    checkpoint_nimg: Optional[int] = None,
) -> tuple[int, int]:
    """Validate the batch layout and the image counts; raise ValueError naming the problem.

    Returns the batch of one accumulation round in one process (``batch_gpu`` clamped to the
    per-process batch) and the number of accumulation rounds.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if batch_size % world_size != 0:
        raise ValueError(f"batch size {batch_size} is not divisible by the number of processes ({world_size})")
    batch_per_process = batch_size // world_size
    if batch_gpu is None or batch_gpu <= 0 or batch_gpu > batch_per_process:
        batch_gpu = batch_per_process
    if batch_per_process % batch_gpu != 0:
        raise ValueError(
            f"batch size {batch_size} is not divisible by processes x batch-gpu ({world_size} x {batch_gpu})"
        )
    for name, value, granule in [
        ("duration", total_nimg, 1),
        ("slice", slice_nimg, 1),
        ("status interval", status_nimg, 1),
        ("snapshot interval", snapshot_nimg, 1024),
        ("checkpoint interval", checkpoint_nimg, 1024),
    ]:
        if value is None:
            continue
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if value % batch_size != 0:
            raise ValueError(f"{name} {value} is not a multiple of the batch size {batch_size}")
        if value % granule != 0:
            raise ValueError(f"{name} {value} is not a multiple of {granule} (file names count kimg)")
    return batch_gpu, batch_per_process // batch_gpu


# ----------------------------------------------------------------------------
# Main training loop. The defaults are the reference's; None for a *_kwargs argument means that
# default too. Deviation: device None = CUDA when available, else the CPU (the reference
# hard-codes CUDA), and pinned memory only with CUDA.

# fmt: off
DEFAULT_KWARGS = dict(  # The reference's defaults of the *_kwargs arguments (the signature shows these very dicts).
    dataset_kwargs      = dict(class_name='training.dataset.ImageFolderDataset', path=None),
    encoder_kwargs      = dict(class_name='training.encoders.StabilityVAEEncoder'),
    data_loader_kwargs  = dict(class_name='torch.utils.data.DataLoader', pin_memory=True, num_workers=2, prefetch_factor=2),
    network_kwargs      = dict(class_name='training.networks_edm2.Precond'),
    loss_kwargs         = dict(class_name='training.training_loop.EDM2Loss'),
    optimizer_kwargs    = dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
    lr_kwargs           = dict(func_name='training.training_loop.learning_rate_schedule'),
    ema_kwargs          = dict(class_name='training.phema.PowerFunctionEMA'),  # False = no EMA (snapshot the raw net).
)


def training_loop(
    dataset_kwargs      = DEFAULT_KWARGS['dataset_kwargs'],
    encoder_kwargs      = DEFAULT_KWARGS['encoder_kwargs'],
    data_loader_kwargs  = DEFAULT_KWARGS['data_loader_kwargs'],
    network_kwargs      = DEFAULT_KWARGS['network_kwargs'],
    loss_kwargs         = DEFAULT_KWARGS['loss_kwargs'],
    optimizer_kwargs    = DEFAULT_KWARGS['optimizer_kwargs'],
    lr_kwargs           = DEFAULT_KWARGS['lr_kwargs'],
    ema_kwargs          = DEFAULT_KWARGS['ema_kwargs'],

    run_dir             = '.',      # Output directory.
    seed                = 0,        # Global random seed.
    batch_size          = 2048,     # Total batch size of one training iteration.
    batch_gpu           = None,     # Limit on the batch of one process in one accumulation round; None = no limit.
    total_nimg          = 8 << 30,  # Train for a total of N training images.
    slice_nimg          = None,     # Train for at most N images in this invocation; None = no limit.
    status_nimg         = 128 << 10,  # Report status every N images; None = disable.
    snapshot_nimg       = 8 << 20,  # Save network snapshots every N images; None = disable.
    checkpoint_nimg     = 128 << 20,  # Save a training checkpoint every N images; None = disable.

    loss_scaling        = 1,        # Loss scaling factor against FP16 under/overflow.
    precision           = None,     # 'fp32', 'fp16' or 'bf16' (CUDA autocast), or a misc.Precision; None = from network_kwargs.use_fp16.
    tf32                = False,    # Allow TF32 in CUDA float32 matmuls and convolutions.
    force_finite        = True,     # Replace NaN/Inf gradient entries by zero before the optimizer step.
    cudnn_benchmark     = True,     # torch.backends.cudnn.benchmark.
    preset_name         = None,     # Name of the configuration preset (informational).
    device              = None,     # None = cuda if available, else cpu.
    monitor_kwargs      = None,     # Watching the run (training.monitoring.TrainingMonitor); None = off.
    compile             = False,    # Run the training network through torch.compile (eager if compiling fails).
    init                = None,     # Network pickle (or .safetensors) whose ema gives the initial weights; None = random.
) -> None:
# fmt: on
    # None for a *_kwargs argument means its default; work on copies, so that no default ever changes.
    dataset_kwargs = _copy_or_default(dataset_kwargs, 'dataset_kwargs')
    encoder_kwargs = _copy_or_default(encoder_kwargs, 'encoder_kwargs')
    data_loader_kwargs = _copy_or_default(data_loader_kwargs, 'data_loader_kwargs')
    network_kwargs = _copy_or_default(network_kwargs, 'network_kwargs')
    loss_kwargs = _copy_or_default(loss_kwargs, 'loss_kwargs')
    optimizer_kwargs = _copy_or_default(optimizer_kwargs, 'optimizer_kwargs')
    lr_kwargs = _copy_or_default(lr_kwargs, 'lr_kwargs')
    ema_kwargs = _copy_or_default(ema_kwargs, 'ema_kwargs')
    if device is None:
        device = misc.default_device()
    device = torch.device(device)
    if device.type != 'cuda' and data_loader_kwargs.get('pin_memory'):
        data_loader_kwargs['pin_memory'] = False  # pinning needs CUDA
    precision = misc.resolve_precision(precision, network_kwargs.get('use_fp16', True), device, tf32)

    # Initialize. `run` holds what every step and every periodic task uses, built once.
    start_time = time.time()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    _initialize(run_dir=run_dir, seed=seed, rank=rank, cudnn_benchmark=cudnn_benchmark, tf32=tf32)
    batch_gpu, num_accumulation_rounds = check_training_config(
        batch_size=batch_size, world_size=world_size, batch_gpu=batch_gpu, total_nimg=total_nimg, slice_nimg=slice_nimg,
        status_nimg=status_nimg, snapshot_nimg=snapshot_nimg, checkpoint_nimg=checkpoint_nimg)
    if preset_name is not None:
        dist.print0(f'Preset: {preset_name}')
    run = dnnlib.EasyDict(run_dir=run_dir, seed=seed, rank=rank, world_size=world_size, device=device, precision=precision,
                          batch_size=batch_size, num_accumulation_rounds=num_accumulation_rounds, loss_scaling=loss_scaling,
                          force_finite=force_finite, lr_kwargs=lr_kwargs, dataset_kwargs=dataset_kwargs, total_nimg=total_nimg,
                          status_nimg=status_nimg, snapshot_nimg=snapshot_nimg, checkpoint_nimg=checkpoint_nimg)

    # Dataset, encoder, network, and the training state.
    dataset_obj, run.encoder, run.net = _construct_dataset_encoder_network(dataset_kwargs, encoder_kwargs, network_kwargs, batch_gpu, device, init)
    dist.print0('Setting up training state...')
    state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0)
    ddp_kwargs = dict(device_ids=([device] if device.type == 'cuda' else None))
    run.ddp = torch.nn.parallel.DistributedDataParallel(run.net, **ddp_kwargs) if world_size > 1 else run.net
    run.loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    run.optimizer = dnnlib.util.construct_class_by_name(params=run.net.parameters(), **optimizer_kwargs)
    run.ema = dnnlib.util.construct_class_by_name(net=run.net, **ema_kwargs) if ema_kwargs is not False else None

    # Resume from the latest checkpoint and decide where this invocation stops.
    run.checkpoint = dist.CheckpointIO(state=state, net=run.net, loss_fn=run.loss_fn, optimizer=run.optimizer, ema=run.ema)
    run.checkpoint.load_latest(run_dir)
    stop_at_nimg = _stop_at_nimg(state.cur_nimg, total_nimg, slice_nimg, checkpoint_nimg, snapshot_nimg, batch_size)
    if stop_at_nimg <= state.cur_nimg:
        dist.print0(f'Nothing to do: training already reached {state.cur_nimg // 1000} kimg.')
        return
    dist.print0(f'Training from {state.cur_nimg // 1000} kimg to {stop_at_nimg // 1000} kimg:')
    dist.print0()

    # Watching the run (TensorBoard, loss by noise level, sample grids, metrics); reached by class
    # name, so this embedded module imports nothing of it. It never changes the training math.
    run.monitor = None if monitor_kwargs is None else dnnlib.util.construct_class_by_name(
        **monitor_kwargs, run_dir=run_dir, start_nimg=state.cur_nimg, loss_fn=run.loss_fn, device=device)

    # The network the loss calls: DDP's, compiled if asked for, recording its noise levels if watched (wrapped once).
    run.loss_net = _compiled_training_net(run.ddp, run.net) if compile else run.ddp
    run.loss_net = run.monitor.wrap_net(run.loss_net) if run.monitor is not None else run.loss_net

    # Data: an infinite sampler that continues the same sequence from cur_nimg on a resume.
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed, start_idx=state.cur_nimg)
    run.dataset_iterator = iter(dnnlib.util.construct_class_by_name(dataset=dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **data_loader_kwargs))
    _train(state, run, start_time, stop_at_nimg)

# ----------------------------------------------------------------------------
# The steps of the training loop, in the order they run.


def _copy_or_default(value, name):
    return copy.deepcopy(DEFAULT_KWARGS[name] if value is None else value)


def _initialize(run_dir, seed, rank, cudnn_benchmark, tf32=False):
    """Fresh statistics, the global seed, float32 math (TF32 only if asked for), and a clean run directory."""
    if hasattr(training_stats, 'reset'):  # Fresh statistics per run (the reference's module has no reset).
        training_stats.reset()
    misc.set_random_seed(seed, rank)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    misc.set_tf32(tf32)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        dnnlib.util.remove_stale_temp_files(run_dir)  # half-written files of a killed run


def _construct_dataset_encoder_network(dataset_kwargs, encoder_kwargs, network_kwargs, batch_gpu, device, init=None):
    """The dataset, the encoder, and a network shaped by the dataset's first item (in latent space),
    with the weights of the network pickle `init` if given (a checkpoint, when resuming, overrides them)."""
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    ref_image, ref_label = dataset_obj[0]
    dist.print0('Setting up encoder...')
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs)
    ref_image = encoder.encode_latents(torch.as_tensor(ref_image).to(device).unsqueeze(0))
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=ref_image.shape[-1], img_channels=ref_image.shape[1], label_dim=ref_label.shape[-1])
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    if init is not None:  # Before the summary below, so that the weights are normalised and shared as usual.
        dist.print0(f'Loading initial weights from "{init}"...')
        net.load_state_dict(persistence.load_network_pickle(init, verbose=(dist.get_rank() == 0))['ema'].state_dict())
    net.train().requires_grad_(True).to(device)

    # The summary's forward pass runs in training mode, so it also force-normalises the weights of
    # rank 0 before DDP broadcasts them and the EMA copies them (as in the reference).
    if dist.get_rank() == 0:
        misc.print_module_summary(net, [
            torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device),
            torch.ones([batch_gpu], device=device),
            torch.zeros([batch_gpu, net.label_dim], device=device),
        ], max_nesting=2)
    return dataset_obj, encoder, net


def _compiled_training_net(ddp, net):
    """``ddp`` run through torch.compile (misc.CompiledNetwork: eager, with one printed line, if compiling fails).

    Inductor mishandles MPConv's forced weight normalisation, an in-place update under no_grad of a
    parameter that the graph then differentiates through: for a 4-D weight the update is lost or the
    gradient is wrong. So before each call the network does its forced normalisation eagerly
    (``force_normalize_weights_``), and the compiled call sees the layers it normalised in eval mode,
    where their forward is the same math without the update.
    """
    # The DDP module is compiled, as torch recommends (its forward has graph breaks; graphs split at its buckets).
    # fallback_random: inductor draws eager's random numbers, so that dropout masks are the eager ones.
    compiled = misc.CompiledNetwork(ddp, fullgraph=(ddp is net), options=dict(fallback_random=True))

    def forward(*args, **kwargs):
        forced = net.force_normalize_weights_()
        for layer in forced:
            layer.training = False
        try:
            return compiled(*args, **kwargs)
        finally:
            for layer in forced:
                layer.training = True
    return forward


def _stop_at_nimg(cur_nimg, total_nimg, slice_nimg, checkpoint_nimg, snapshot_nimg, batch_size):
    """Where this invocation ends: the total, or the slice end rounded down to the checkpoint
    interval (else the snapshot interval, else the batch), so that a slice ends on a checkpoint."""
    if slice_nimg is None:
        return total_nimg
    granularity = checkpoint_nimg if checkpoint_nimg is not None else snapshot_nimg if snapshot_nimg is not None else batch_size
    return min(total_nimg, (cur_nimg + slice_nimg) // granularity * granularity)


def _progress_bar(stop_at_nimg, cur_nimg):
    """A progress bar on the terminal only (never in log.txt)."""
    import tqdm  # Lazily: the reference tools that execute this module need not have it.
    return tqdm.tqdm(total=stop_at_nimg, initial=cur_nimg, unit='img', unit_scale=True, leave=False,
                     file=sys.__stderr__, disable=None, dynamic_ncols=True)


def _train(state, run, start_time, stop_at_nimg):
    """At every step, first the periodic reports and files, then one optimization step, until the end
    of this invocation."""
    # training_time: time in optimization steps during the current status tick; run_training_clock: during
    # this invocation (which started at invocation_start_nimg), by the monitor's clock, so that its grid budget
    # compares like with like.
    tick = dnnlib.EasyDict(start_time=start_time, start_nimg=state.cur_nimg, training_time=0.0,
                           invocation_start_nimg=state.cur_nimg, run_training_clock=0.0)
    clock = run.monitor.clock if run.monitor is not None else time.perf_counter
    progress = _progress_bar(stop_at_nimg, state.cur_nimg) if run.rank == 0 else None
    try:
        while not _periodic_tasks(state, run, tick, stop_at_nimg, progress):
            step_start_time, step_start_clock = time.time(), clock()
            _optimization_step(state, run)
            tick.run_training_clock += clock() - step_start_clock
            tick.training_time += time.time() - step_start_time
            if progress is not None:
                progress.update(run.batch_size)
    finally:
        if progress is not None:
            progress.close()
        if run.monitor is not None:
            run.monitor.close()


def _periodic_tasks(state, run, tick, stop_at_nimg, progress):
    """Status line and statistics, snapshots (and what the monitor does with them), checkpoints, each
    when due at the current image count. Returns whether this invocation ends here."""
    monitor, rank = run.monitor, run.rank
    done = (state.cur_nimg >= stop_at_nimg)
    fresh_or_advanced = (state.cur_nimg != tick.invocation_start_nimg or tick.invocation_start_nimg == 0)  # a resume repeats nothing at its start
    do_status = run.status_nimg is not None and (done or state.cur_nimg % run.status_nimg == 0) and fresh_or_advanced
    snapshot_due = run.snapshot_nimg is not None and state.cur_nimg % run.snapshot_nimg == 0 and fresh_or_advanced
    do_snapshot = snapshot_due and rank == 0
    do_checkpoint = run.checkpoint_nimg is not None and (done or state.cur_nimg % run.checkpoint_nimg == 0) and state.cur_nimg != tick.invocation_start_nimg
    if progress is not None and (do_status or do_snapshot or do_checkpoint):
        progress.clear()
    if do_status:
        _report_status(state, tick, run.device)
        stats_items = _write_stats(run.run_dir, rank)
        if monitor is not None and rank == 0:
            monitor.on_status(state.cur_nimg, stats_items)  # the same values as TensorBoard scalars
        if _should_end_invocation(state.cur_nimg, stop_at_nimg, run.total_nimg):
            done = True
    if do_snapshot:
        _save_snapshots(run.run_dir, state.cur_nimg, run.net, run.ema, run.encoder, run.dataset_kwargs, run.loss_fn)
    if monitor is not None and snapshot_due:  # every rank: metrics are collective
        monitor.on_snapshot(state.cur_nimg, ema=run.ema, net=run.net, encoder=run.encoder, training_sec=tick.run_training_clock)
    if do_checkpoint:
        _save_checkpoint(run.run_dir, state.cur_nimg, run.checkpoint, run.net, run.world_size)
    return done


def _report_status(state, tick, device):
    """Print the status line and report its numbers as statistics; start a new tick."""
    cur_time = time.time()
    state.total_elapsed_time += cur_time - tick.start_time
    cur_process = psutil.Process(os.getpid())
    on_cuda = (device.type == 'cuda')
    values = {
        'Progress/kimg':                        state.cur_nimg / 1e3,
        'Timing/total_sec':                     state.total_elapsed_time,
        'Timing/sec_per_tick':                  cur_time - tick.start_time,
        'Timing/sec_per_kimg':                  tick.training_time / max(state.cur_nimg - tick.start_nimg, 1) * 1e3,
        'Timing/maintenance_sec':               cur_time - tick.start_time - tick.training_time,
        'Resources/cpu_mem_gb':                 sum(p.memory_info().rss for p in [cur_process] + cur_process.children(recursive=True)) / 2**30,
        'Resources/peak_gpu_mem_gb':            torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0,
        'Resources/peak_gpu_mem_reserved_gb':   torch.cuda.max_memory_reserved(device) / 2**30 if on_cuda else 0,
    }
    for name, value in values.items():
        training_stats.report0(name, value)
    v = list(values.values())
    dist.print0(' '.join(['Status:',
        'kimg',         f'{v[0]:<9.1f}',
        'time',         f'{dnnlib.util.format_time(v[1]):<12s}',
        'sec/tick',     f'{v[2]:<8.2f}',
        'sec/kimg',     f'{v[3]:<7.3f}',
        'maintenance',  f'{v[4]:<7.2f}',
        'cpumem',       f'{v[5]:<6.2f}',
        'gpumem',       f'{v[6]:<6.2f}',
        'reserved',     f'{v[7]:<6.2f}',
    ]))
    tick.update(start_time=cur_time, start_nimg=state.cur_nimg, training_time=0.0)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)


def _format_stats_line(items):
    """One stats.jsonl line: values '%g' (kimg and timestamp '%.3f'), non-finite values as NaN."""
    fmt = {'Progress/kimg': '%.3f', 'timestamp': '%.3f'}
    fields = [f'"{name}": ' + (fmt.get(name, '%g') % value if np.isfinite(value) else 'NaN') for name, value in items]
    return '{' + ', '.join(fields) + '}\n'


def _write_stats(run_dir, rank):
    """Append the means of this tick's statistics (reduced across processes) to stats.jsonl; rank 0
    returns them as (name, value) pairs."""
    training_stats.default_collector.update()  # every rank: a collective call
    if rank != 0:
        return None
    items = [(name, value.mean) for name, value in training_stats.default_collector.as_dict().items()]
    items.append(('timestamp', time.time()))
    with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
        f.write(_format_stats_line(items))
    return items


def _should_end_invocation(cur_nimg, stop_at_nimg, total_nimg):
    """Tell a cluster manager about the progress; whether it (or the end of a slice) ends this invocation."""
    dist.update_progress(cur_nimg // 1000, stop_at_nimg // 1000)
    if cur_nimg == stop_at_nimg and cur_nimg < total_nimg:
        dist.request_suspend()
    return dist.should_stop() or dist.should_suspend()


def _save_snapshots(run_dir, cur_nimg, net, ema, encoder, dataset_kwargs, loss_fn):
    """One network pickle per EMA profile (float16 on the CPU, eval mode), written atomically."""
    ema_list = ema.get() if ema is not None else net
    ema_list = ema_list if isinstance(ema_list, list) else [(ema_list, '')]
    for ema_net, ema_suffix in ema_list:
        data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn)
        # Module.to(dtype) casts floating-point parameters and buffers alike.
        data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
        fname = f'network-snapshot-{cur_nimg // 1000:07d}{ema_suffix}.pkl'
        dist.print0(f'Saving {fname} ... ', end='', flush=True)
        with dnnlib.util.atomic_write(os.path.join(run_dir, fname), 'wb') as f:
            pickle.dump(data, f)
        dist.print0('done')
        del data  # conserve memory


def _save_checkpoint(run_dir, cur_nimg, checkpoint, net, world_size):
    """The training state (never at the start, always at the end); rank 0 writes it."""
    checkpoint.save(os.path.join(run_dir, f'training-state-{cur_nimg // 1000:07d}.pt'))
    if world_size > 1:
        misc.check_ddp_consistency(net)


def _optimization_step(state, run):
    """One iteration: reseed, accumulate the gradients of the whole batch, set the learning rate,
    step the optimizer, advance the image count and update the EMA."""
    net, loss_fn, optimizer, monitor, device = run.net, run.loss_fn, run.optimizer, run.monitor, run.device
    misc.set_random_seed(run.seed, run.rank, state.cur_nimg)
    optimizer.zero_grad(set_to_none=True)
    batch_per_process = run.batch_size // run.world_size
    for round_idx in range(run.num_accumulation_rounds):
        with misc.ddp_sync(run.ddp, (round_idx == run.num_accumulation_rounds - 1)):  # DDP syncs on the last round only
            images, labels = next(run.dataset_iterator)
            images = run.encoder.encode_latents(images.to(device))
            with misc.autocast(run.precision):  # the forward pass; backward runs in the dtypes it recorded
                loss = loss_fn(net=run.loss_net, images=images, labels=labels.to(device))
            training_stats.report('Loss/loss', loss)
            if monitor is not None:
                monitor.report_loss(loss)
            loss.sum().mul(run.loss_scaling / batch_per_process).backward()

    # Learning rate of this step from the image count before it. A plain float: the optimizer
    # state (with its lr) must load with torch.load(weights_only=True).
    lr = float(dnnlib.util.call_func_by_name(cur_nimg=state.cur_nimg, batch_size=run.batch_size, **run.lr_kwargs))
    training_stats.report('Loss/learning_rate', lr)
    for g in optimizer.param_groups:
        g['lr'] = lr
    if run.force_finite:
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
    if monitor is not None:
        monitor.report_gradients(net, run.loss_scaling)
    optimizer.step()

    state.cur_nimg += run.batch_size
    if run.ema is not None:
        run.ema.update(cur_nimg=state.cur_nimg, batch_size=run.batch_size)

# ----------------------------------------------------------------------------
