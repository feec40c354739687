"""Peak memory of ``calculate_metrics.py sweep`` against the number of EMA lengths swept.

Builds an EDM2 network (``--channels``; 64 gives ~31M parameters, a ~60 MB float16 snapshot), saves
one raw snapshot and hard-links it under several snapshot names, then runs the sweep in a fresh
process per row, over N EMA lengths with ``--ema-batch`` of them reconstructed per pass over the
snapshots, and reads that process's peak RSS from the kernel (``wait4``). Each point generates 2
images in 1 step and a stand-in detector measures them, so the memory is that of the reconstruction
and the networks. The fixed overhead is the peak RSS of a process that imports the tool and exits.
The sweep should stay below (``--ema-batch`` + 2) x one network's float32 size plus that overhead,
whatever N, and grow with N only when the batch does (the last row).

    python benchmarks/sweep_memory.py                        # N = 1, 4, 8, 16 at --ema-batch=4, then 16 at once
    python benchmarks/sweep_memory.py --channels=32 --counts=1,4   # quicker
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
# This process stays small and imports no torch: a child's peak RSS as the kernel reports it
# includes what it shared with this parent at fork time.

# The sweep with a stand-in FID detector (channel means over 2x2 blocks), so no download is needed.
RUNNER = """
import sys, torch
import calculate_metrics as cm
class Pool(torch.nn.Module):
    feature_dim = 12
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32), 2).flatten(1)
cm.register_detector("fid", Pool())
cm.cmdline(sys.argv[1:])
"""


def write_inputs(root, channels, inputs):
    """One snapshot (img 32x32x3, 10 classes) hard-linked under ``inputs`` names; the reference statistics."""
    import pickle

    import numpy as np
    import torch

    import dnnlib
    from training import encoders, metrics, networks_edm2, training_loop

    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=32, img_channels=3, label_dim=10, model_channels=channels)
    net = net.eval().requires_grad_(False).to(torch.float16)
    data = dnnlib.EasyDict(
        encoder=encoders.StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="d.zip", use_labels=True),
        loss_fn=training_loop.EDM2Loss(),
        ema=net,
    )
    in_dir = os.path.join(root, "in")
    os.makedirs(in_dir)
    first = os.path.join(root, "first.pkl")
    with open(first, "wb") as f:
        pickle.dump(data, f)
    for i in range(inputs // 2):
        kimg = (i + 1) * 8 * 2**20 // 1000
        for std in ("0.050", "0.100"):
            os.link(first, os.path.join(in_dir, f"network-snapshot-{kimg:07d}-{std}.pkl"))
    rng = np.random.default_rng(0)
    metrics.save_stats(
        dict(num_images=100, fid=dict(mu=rng.random(12), sigma=np.eye(12))),
        os.path.join(root, "ref.pkl"),
        verbose=False,
    )
    print(sum(p.numel() for p in net.parameters()), os.path.getsize(first))


def peak_rss(cmd, env):
    """Run ``cmd``; return (peak RSS in bytes, seconds, output). Fails loudly if the command fails."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')}")
    return usage.ru_maxrss * 1024, time.time() - t0, out.decode(errors="replace")


# fmt: off
@click.command()
@click.option("--channels", help="model_channels of the network", type=int, default=64, show_default=True)
@click.option("--inputs", help="Number of raw snapshots", type=int, default=8, show_default=True)
@click.option("--counts", help="Numbers of EMA lengths to sweep", type=str, default="1,4,8,16", show_default=True)
@click.option("--ema-batch", help="EMA lengths per pass over the snapshots", type=int, default=4, show_default=True)
@click.option("--workdir", help="Scratch folder (default: a temporary one)", type=str, default=None)
@click.option("--write-inputs", "inputs_root", help="(internal) write the inputs here and exit", type=str, default=None, hidden=True)
# fmt: on
def main(channels, inputs, counts, ema_batch, workdir, inputs_root):
    if inputs_root is not None:
        write_inputs(inputs_root, channels, inputs)
        return
    counts = [int(c) for c in counts.split(",")]
    rows = [(n, min(n, ema_batch)) for n in counts] + [(max(counts), max(counts))]  # last: every length at once
    root = tempfile.mkdtemp(prefix="sweep-memory-", dir=workdir)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    try:
        _, _, out = peak_rss([sys.executable, os.path.abspath(__file__), f"--channels={channels}", f"--inputs={inputs}", f"--write-inputs={root}"], env)
        num_params, pkl_bytes = (int(x) for x in out.split()[-2:])
        net_bytes = num_params * 4  # one network in float32: one accumulator of the reconstruction
        base, _, _ = peak_rss([sys.executable, "-c", "import calculate_metrics"], env)
        print(f"Network: {num_params / 1e6:.1f}M parameters, {net_bytes / 2**20:.0f} MiB in float32, snapshot pickle {pkl_bytes / 2**20:.0f} MiB; {2 * (inputs // 2)} inputs")
        print(f"Fixed overhead (peak RSS of 'import calculate_metrics'): {base / 2**20:.0f} MiB")
        print()
        print("| EMA lengths | --ema-batch | peak RSS (MiB) | above overhead (MiB) | in networks | about (batch + 2) | time (s) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for n, batch in rows:
            out_dir = os.path.join(root, f"out-{n}-{batch}")
            emas = ",".join(f"{0.02 + 0.01 * i:.3f}" for i in range(n))
            args = ["sweep", f"--net={root}/in", f"--ema={emas}", f"--ref={root}/ref.pkl", "--metrics=fid", "--num=2"]
            args += ["--steps=1", "--sampler=euler", f"--ema-batch={batch}", f"--outdir={out_dir}"]
            rss, secs, _ = peak_rss([sys.executable, "-c", RUNNER] + args, env)
            with open(os.path.join(out_dir, "sweep.jsonl")) as f:
                assert len(f.readlines()) == n
            above = (rss - base) / net_bytes
            print(f"| {n} | {batch} | {rss / 2**20:.0f} | {(rss - base) / 2**20:.0f} | {above:.2f} | {batch + 2} | {secs:.1f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
