"""Training throughput (images/s) and peak memory of small configurations, fp32 on the CPU (or on
the GPU where there is one), measured by running the real training loop on synthetic data.

Each configuration runs in its own process, so that its peak memory is its own:

    python benchmarks/train_throughput.py                      # both CPU presets, default settings
    python benchmarks/train_throughput.py --kimg 8 --threads 2
    python benchmarks/train_throughput.py --config cpu-16

Throughput counts only the training steps (the loop's Timing/sec_per_kimg, i.e. without snapshot
and status maintenance) over all status ticks after the first (warm-up) one.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

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


@click.command()
@click.option("--config", "configs", help="Configuration (repeatable)", type=click.Choice(list(CONFIGS)), multiple=True)
@click.option(
    "--kimg",
    help="Thousands of training images per configuration",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
)
@click.option(
    "--threads", help="torch threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True
)
@click.option("--worker", help="(internal) run one configuration and print JSON", hidden=True, type=str, default=None)
def main(configs, kimg, threads, worker):
    """Measure training throughput and peak memory of small configurations."""
    if worker is not None:
        print("RESULT " + json.dumps(run_config(worker, kimg, threads)))
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
