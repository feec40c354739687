"""Peak memory of reconstruct_phema.py against the number of outputs per pass.

Builds an EDM2 network of the edm2-img512-xs size (~125M parameters: ~500 MB in float32, a
~250 MB float16 snapshot, like the published raw snapshots), saves one snapshot and hard-links
it under several snapshot names, then runs ``reconstruct_phema.py`` in a fresh process for each
``--batch`` size and reads that process's peak RSS from the kernel (``wait4``). The fixed
overhead is the peak RSS of a process that imports the tool and exits. The streaming design
should stay below (outputs in the batch + 2) x one network's float32 size plus that overhead.

    python benchmarks/phema_memory.py                 # xs-sized network, batches 1, 2, 4, 8
    python benchmarks/phema_memory.py --channels=64 --batches=1,4 --inputs=4   # quicker
"""

import os
import pickle
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


def write_snapshot(path, channels):
    """Save a snapshot dict of an img512-style EDM2 network; return its parameter count."""
    import torch

    import dnnlib
    from training import encoders, networks_edm2, training_loop

    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=channels)
    net = net.eval().requires_grad_(False).to(torch.float16)
    data = dnnlib.EasyDict(
        encoder=encoders.StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip", use_labels=True
        ),
        loss_fn=training_loop.EDM2Loss(),
        ema=net,
    )
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return sum(p.numel() for p in net.parameters())


def peak_rss(cmd, env):
    """Run ``cmd``; return (peak RSS in bytes, seconds, output). Fails loudly if the command fails."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')}")
    return usage.ru_maxrss * 1024, time.time() - t0, out.decode(errors="replace")


@click.command()
@click.option("--channels", help="model_channels of the network", type=int, default=128, show_default=True)
@click.option("--inputs", help="Number of input snapshots", type=int, default=8, show_default=True)
@click.option("--batches", help="Outputs per pass to measure", type=str, default="1,2,4,8", show_default=True)
@click.option("--workdir", help="Scratch folder (default: a temporary one)", type=str, default=None)
@click.option(
    "--write-snapshot",
    "snapshot_path",
    help="(internal) write one snapshot here and exit",
    type=str,
    default=None,
    hidden=True,
)
def main(channels, inputs, batches, workdir, snapshot_path):
    if snapshot_path is not None:
        print(write_snapshot(snapshot_path, channels))
        return
    batches = [int(b) for b in batches.split(",")]
    root = tempfile.mkdtemp(prefix="phema-memory-", dir=workdir)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    try:
        in_dir = os.path.join(root, "in")
        os.makedirs(in_dir)
        first = os.path.join(in_dir, "first.bin")
        _, _, out = peak_rss(
            [sys.executable, os.path.abspath(__file__), f"--channels={channels}", f"--write-snapshot={first}"], env
        )
        num_params = int(out.split()[-1])
        net_bytes = num_params * 4  # one network in float32: the size of one output's accumulator
        pkl_bytes = os.path.getsize(first)
        # Same content under several snapshot names (times 8Mi apart, two EMA lengths each).
        for i in range(inputs // 2):
            kimg = (i + 1) * 8 * 2**20 // 1000
            for std in ("0.050", "0.100"):
                os.link(first, os.path.join(in_dir, f"network-snapshot-{kimg:07d}-{std}.pkl"))
        os.remove(first)

        base, _, _ = peak_rss([sys.executable, "-c", "import reconstruct_phema"], env)
        print(
            f"Network: {num_params / 1e6:.1f}M parameters, {net_bytes / 2**20:.0f} MiB in float32, "
            f"snapshot pickle {pkl_bytes / 2**20:.0f} MiB; {2 * (inputs // 2)} inputs"
        )
        print(f"Fixed overhead (peak RSS of 'import reconstruct_phema'): {base / 2**20:.0f} MiB")
        print()
        print("| outputs per pass | peak RSS (MiB) | above overhead (MiB) | in networks | bound (n + 2) | time (s) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for b in batches:
            out_dir = os.path.join(root, f"out{b}")
            stds = ",".join(f"{0.02 + 0.01 * i:.3f}" for i in range(b))
            cmd = [
                sys.executable,
                os.path.join(REPO_ROOT, "reconstruct_phema.py"),
                f"--indir={in_dir}",
                f"--outdir={out_dir}",
                f"--outstd={stds}",
                f"--batch={b}",
            ]
            rss, secs, _ = peak_rss(cmd, env)
            assert len(os.listdir(out_dir)) == b
            shutil.rmtree(out_dir)
            above = (rss - base) / net_bytes
            print(
                f"| {b} | {rss / 2**20:.0f} | {(rss - base) / 2**20:.0f} | {above:.2f} | {b + 2} | {secs:.1f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
