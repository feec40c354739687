"""Training throughput, fp32 on the CPU (or on the GPU where there is one).

Default (step mode): one process times single training steps of the benchmark network (``Precond``
res 32, 32 channels, channel_mult [1,2,2], 2 blocks, attention at 16x16 and 8x8, 10 classes, batch
16), built as the training loop builds it: EDM2Loss, Adam with betas (0.9, 0.99), force-finite
gradients, a two-profile PowerFunctionEMA. The variants run in alternating rounds (so that load from
other processes affects all alike), from the same initial weights on the same batches and noise;
the table gives the median steady-state images/s (also per CPU-second of this process: with one
thread nearly independent of load from other processes), the one-time compile cost, and the largest
difference of the weights (and of the EMA weights) from the eager variant's after all steps.

Variants (``--variants``, comma-separated):

    eager            the training loop's step as it is (the reference's speed)
    eager-foreach    Adam(foreach=True) and the EMA updated with torch._foreach_lerp_
    eager-fused      Adam(fused=True) and the foreach EMA
    cl               eager, channels_last weights and images
    compiled         the network compiled as training_loop(compile=True) does (forward and backward; the
                     forced weight normalisation eagerly before each call), the rest as eager
    compiled-fused   compiled, Adam(fused=True) and the foreach EMA

    python benchmarks/train_throughput.py --threads 1
    python benchmarks/train_throughput.py --threads 2 --variants eager,compiled-fused

Loop mode (``--loop``) runs the real training loop of the small CPU presets on synthetic data, each
configuration in its own process so that its peak memory is its own:

    python benchmarks/train_throughput.py --loop                      # both CPU presets
    python benchmarks/train_throughput.py --loop --kimg 8 --threads 2
    python benchmarks/train_throughput.py --loop --config cpu-16

Loop-mode throughput counts only the training steps (the loop's Timing/sec_per_kimg, i.e. without
snapshot and status maintenance) over all status ticks after the first (warm-up) one.
"""

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ["eager", "eager-foreach", "eager-fused", "cl", "compiled", "compiled-fused"]
DEFAULT_VARIANTS = "eager,eager-foreach,eager-fused,compiled,compiled-fused"

# name: (resolution, preset whose network and batch are used)
CONFIGS = {
    "cpu-16": (16, "cpu-16"),
    "cpu-32": (32, "cpu-32"),
}


def run_config(name: str, kimg: int, threads: int) -> dict:
    """Train configuration ``name`` for ``kimg`` thousand images in this process; return the numbers."""
    import torch

    import train_edm2
    from tests.scripts.train_helpers import random_dataset_zip
    from training import training_loop

    torch.set_num_threads(threads)
    resolution, preset = CONFIGS[name]
    p = train_edm2.config_presets[preset]
    batch = p.batch
    status = max(batch, (kimg * 1000 // 4) // batch * batch)
    total = status * 4
    with tempfile.TemporaryDirectory() as tmp:
        data = random_dataset_zip(os.path.join(tmp, "data.zip"), num_images=512, resolution=resolution, num_classes=10)
        run_dir = os.path.join(tmp, "run")
        net_kwargs = dict(
            class_name="training.networks_edm2.Precond",
            model_channels=p.channels,
            dropout=p.dropout,
            use_fp16=False,
            channel_mult=p.channel_mult,
            num_blocks=p.num_blocks,
            attn_resolutions=p.attn_resolutions,
            channels_per_head=p.channels_per_head,
        )
        start = time.time()
        training_loop.training_loop(
            dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data, use_labels=True),
            encoder_kwargs=dict(class_name="training.encoders.StandardRGBEncoder"),  # the default is the VAE's
            network_kwargs=net_kwargs,
            loss_kwargs=dict(class_name="training.training_loop.EDM2Loss", P_mean=p.P_mean, P_std=p.P_std),
            lr_kwargs=dict(
                func_name="training.training_loop.learning_rate_schedule",
                ref_lr=p.lr,
                ref_batches=p.decay,
                rampup_Mimg=p.rampup / 1e6,
            ),
            run_dir=run_dir,
            batch_size=batch,
            total_nimg=total,
            status_nimg=status,
            snapshot_nimg=None,
            checkpoint_nimg=None,
        )
        wall = time.time() - start
        with open(os.path.join(run_dir, "stats.jsonl")) as f:
            stats = [json.loads(line) for line in f]
    ticks = [s for s in stats if s["Progress/kimg"] > 0][1:]  # skip the warm-up tick
    sec_per_kimg = sum(s["Timing/sec_per_kimg"] for s in ticks) / len(ticks)
    net = __import__("dnnlib").util.construct_class_by_name(
        **net_kwargs, img_resolution=resolution, img_channels=3, label_dim=10
    )
    result = dict(
        config=name,
        resolution=resolution,
        batch=batch,
        params=sum(x.numel() for x in net.parameters()),
        images_per_sec=1000 / sec_per_kimg,
        wall_sec=wall,
        device="cuda" if torch.cuda.is_available() else "cpu",
        threads=threads,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# ----------------------------------------------------------------------------
# Step mode.


def foreach_ema_update(ema, cur_nimg: int, batch_size: int) -> None:
    """PowerFunctionEMA.update with one torch._foreach_lerp_ per profile instead of a loop over the
    parameters (a prototype)."""
    import torch

    from training import phema

    with torch.no_grad():
        net_params = [p.detach() for p in ema.net.parameters()]
        for std, ema_net in zip(ema.stds, ema.emas):
            beta = phema.power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size)
            torch._foreach_lerp_(list(ema_net.parameters()), net_params, 1.0 - beta)


class Trainer:
    """One variant: its own network, optimizer and EMA, stepping as training_loop's _optimization_step."""

    def __init__(self, name: str, net, batch: int):
        import torch

        from training import phema, training_loop

        self.name = name
        self.batch = batch
        self.net = copy.deepcopy(net)
        self.channels_last = name == "cl"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        opt = dict(betas=(0.9, 0.99), eps=1e-8)  # train_edm2.py's Adam
        if name == "eager-foreach":
            opt["foreach"] = True
        if name in ("eager-fused", "compiled-fused"):
            opt["fused"] = True
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3, **opt)
        self.ema = phema.PowerFunctionEMA(self.net, stds=(0.050, 0.100))
        self.foreach_ema = name in ("eager-foreach", "eager-fused", "compiled-fused")
        self.loss_fn = training_loop.EDM2Loss()
        self.compiled = name.startswith("compiled")
        self.fn = (
            training_loop._compiled_training_net(self.net, self.net) if self.compiled else self.net
        )  # as --compile
        if self.channels_last:  # the loss draws its noise like the images, so they enter channels_last only here
            self.fn = lambda x, *args, **kwargs: self.net(
                x.contiguous(memory_format=torch.channels_last), *args, **kwargs
            )
        self.cur_nimg = 0

    def step(self, images, labels, seed: int) -> float:
        import torch

        torch.manual_seed(seed)  # the same sigma and noise for every variant
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(net=self.fn, images=images, labels=labels)
        loss.sum().mul(1 / self.batch).backward()
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
        self.optimizer.step()
        self.cur_nimg += self.batch
        if self.foreach_ema:
            foreach_ema_update(self.ema, self.cur_nimg, self.batch)
        else:
            self.ema.update(cur_nimg=self.cur_nimg, batch_size=self.batch)
        return float(loss.detach().mean())


def max_param_diff(a, b) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def step_benchmark(
    batch: int, res: int, img_channels: int, channels: int, steps: int, rounds: int, names: list, threads
) -> None:
    import torch
    from sample_throughput import build_net

    if threads is not None:
        torch.set_num_threads(threads)
    net = build_net(res, channels, label_dim=10, device=torch.device("cpu"), img_channels=img_channels, train=True)
    gen = torch.Generator().manual_seed(123)
    data = [
        (
            torch.randn([batch, img_channels, res, res], generator=gen) * 0.5,
            torch.eye(10)[torch.randint(10, [batch], generator=gen)],
        )
        for _ in range(4)
    ]
    params = sum(p.numel() for p in net.parameters())
    print(
        f"device=cpu threads={torch.get_num_threads()} res={res} img_channels={img_channels} channels={channels} "
        f"params={params / 1e6:.2f}M batch={batch} steps/round={steps} rounds={rounds} (median), torch {torch.__version__}"
    )
    trainers = [Trainer(name, net, batch) for name in names]
    step_idx = 0
    first = {}
    losses = {t.name: [] for t in trainers}

    def run_steps(t, count: int, start: int):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            images, labels = data[(start + i) % len(data)]
            losses[t.name].append(t.step(images, labels, seed=start + i))
        return (time.perf_counter() - begin) / count, (time.process_time() - begin_cpu) / count

    for t in trainers:  # warm-up: the first step compiles; two more settle the allocator and the optimizer state
        first[t.name] = run_steps(t, 1, step_idx)[0]
        run_steps(t, 2, step_idx + 1)
    step_idx += 3
    times = {t.name: [] for t in trainers}
    cpu_times = {t.name: [] for t in trainers}
    for _ in range(rounds):
        for t in trainers:
            wall, cpu = run_steps(t, steps, step_idx)
            times[t.name].append(wall)
            cpu_times[t.name].append(cpu)
        step_idx += steps
    ref = trainers[0]
    eager_median = statistics.median(times[ref.name])
    eager_cpu = statistics.median(cpu_times[ref.name])
    print()
    print(
        "| variant | img/s (median) | min–max img/s | ms/step | speed-up vs eager | img per CPU-s | speed-up (CPU time) "
        "| compile + first step (s) | "
        "max abs diff weights | max abs diff EMA | max abs diff loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in trainers:
        med = statistics.median(times[t.name])
        cpu = statistics.median(cpu_times[t.name])
        dw = max_param_diff(ref.net, t.net)
        de = max(max_param_diff(a, b) for a, b in zip(ref.ema.emas, t.ema.emas))
        dl = max(abs(a - b) for a, b in zip(losses[ref.name], losses[t.name]))
        compile_cell = f"{first[t.name]:.1f}" if t.name.startswith("compiled") else "–"
        print(
            f"| {t.name} | {batch / med:.1f} | {batch / max(times[t.name]):.1f}–{batch / min(times[t.name]):.1f} | "
            f"{med * 1e3:.0f} | {eager_median / med:.2f}x | {batch / cpu:.1f} | {eager_cpu / cpu:.2f}x | {compile_cell} | {dw:.1e} | {de:.1e} | {dl:.1e} |",
            flush=True,
        )
    print(f"({step_idx} steps per variant; weights have unit RMS per output channel)")


def parse_variants(s: str) -> list:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in names if x not in VARIANTS]
    if bad or not names:
        raise click.BadParameter(f"choose from {', '.join(VARIANTS)}", param_hint="--variants")
    return ["eager"] + [x for x in names if x != "eager"]


@click.command()
@click.option(
    "--loop",
    help="Measure the real training loop of the CPU presets instead of single steps",
    is_flag=True,
    default=False,
)
@click.option(
    "--config", "configs", help="--loop: configuration (repeatable)", type=click.Choice(list(CONFIGS)), multiple=True
)
@click.option(
    "--kimg",
    help="--loop: thousands of training images per configuration",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
)
@click.option(
    "--threads", help="torch threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True
)
@click.option("--worker", help="(internal) run one configuration and print JSON", hidden=True, type=str, default=None)
@click.option("--batch", help="Step mode: batch size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--res", help="Step mode: image resolution", type=click.IntRange(min=8), default=32, show_default=True)
@click.option(
    "--img-channels", help="Step mode: image channels", type=click.IntRange(min=1), default=3, show_default=True
)
@click.option("--channels", help="Step mode: model_channels", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--steps", help="Step mode: steps per round", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--rounds", help="Step mode: timed rounds (median kept)", type=click.IntRange(min=1), default=5, show_default=True
)
@click.option(
    "--variants", help="Step mode: comma-separated variants", type=str, default=DEFAULT_VARIANTS, show_default=True
)
def main(loop, configs, kimg, threads, worker, batch, res, img_channels, channels, steps, rounds, variants):
    """Training throughput: eager vs compiled/foreach steps (default), or the real loop (--loop)."""
    if worker is not None:
        print("RESULT " + json.dumps(run_config(worker, kimg, threads)))
        return
    if not loop:
        step_benchmark(batch, res, img_channels, channels, steps, rounds, parse_variants(variants), threads)
        return
    rows = []
    for name in configs or list(CONFIGS):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            name,
            "--kimg",
            str(kimg),
            "--threads",
            str(threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise click.ClickException(
                f"{name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    print(
        "| config | resolution | batch | params | device | threads | images/s | peak RSS (GB) |"
        + (" peak GPU (GB) |" if "peak_gpu_gb" in rows[0] else "")
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if "peak_gpu_gb" in rows[0] else ""))
    for r in rows:
        print(
            f"| {r['config']} | {r['resolution']}x{r['resolution']} | {r['batch']} | {r['params'] / 1e3:.0f}k | {r['device']} | "
            f"{r['threads']} | {r['images_per_sec']:.0f} | {r['peak_rss_gb']:.2f} |"
            + (f" {r['peak_gpu_gb']:.2f} |" if "peak_gpu_gb" in r else "")
        )


if __name__ == "__main__":
    main()
