"""Benchmark: how close each sampler gets to the exact ODE solution for a given number of network
evaluations (NFE), on a network trained here, with and without guidance.

Trains a small class-conditional network (the ``cpu-16`` preset, shortened) on scikit-learn's digits
at 16x16, keeping a snapshot early in training, then samples the same seeds with each sampler at
NFE ~ 7, 11, 15, 21, 31, 63 and prints the RMS error of the result (in the network's [-1, 1] pixel
units) against a converged solution: Heun with ``--ref-steps`` steps. With guidance the early
snapshot guides the final network (autoguidance: a less trained version of the same model).
Heun makes 2N - 1 evaluations in N steps, Euler and DPM-Solver++(2M) N; with guidance each step also
evaluates the guiding network once per evaluation of the main one.

    python benchmarks/sampler_accuracy.py --threads 1                         # trains, then samples
    python benchmarks/sampler_accuracy.py --workdir=sampler-bench --plot=docs/sampler_accuracy.png  # as recorded

With ``--workdir`` the training run is kept and reused by the next invocation.
"""

import os
import subprocess
import sys
import tempfile
import time

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "scripts"))

from torch_utils import persistence  # noqa: E402
from training import sampling  # noqa: E402

NFE_TARGETS = [7, 11, 15, 21, 31, 63]
STEPS_FOR_NFE = {"heun": lambda nfe: (nfe + 1) // 2, "euler": lambda nfe: nfe, "dpmpp-2m": lambda nfe: nfe}


def train(workdir: str, kimg: int, snapshot_kimg: int, threads: int) -> str:
    """Train ``cpu-16`` on the digits for ``kimg`` thousand (Ki) images; return the run directory."""
    from train_helpers import digits_dataset_zip

    run_dir = os.path.join(workdir, "run")
    if os.path.isfile(_snapshot(run_dir, kimg)):
        return run_dir
    data = os.path.join(workdir, "digits16.zip")
    if not os.path.isfile(data):
        digits_dataset_zip(data, resolution=16)
    cmd = [sys.executable, os.path.join(REPO, "train_edm2.py"), f"--outdir={run_dir}", f"--data={data}"]
    cmd += ["--preset=cpu-16", f"--duration={kimg}Ki", f"--snapshot={snapshot_kimg}Ki", "--checkpoint=0", "--grid=0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.time()
    print(f"Training: {' '.join(cmd[1:])}")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"Trained {kimg}Ki images in {time.time() - start:.0f} s")
    return run_dir


def _snapshot(run_dir: str, kimg: int, ema: str = "0.100") -> str:
    return os.path.join(run_dir, f"network-snapshot-{(kimg << 10) // 1000:07d}-{ema}.pkl")


def load_net(path: str) -> torch.nn.Module:
    net = persistence.load_network_pickle(path, trust_embedded_code=True)["ema"]
    return net.float().eval().requires_grad_(False)


@torch.no_grad()
def sample(net, gnet, guidance, sampler, num_steps, noise, labels, batch=64) -> torch.Tensor:
    fn = sampling.SAMPLERS[sampler]
    parts = [
        fn(net, noise[i : i + batch], labels[i : i + batch], gnet=gnet, guidance=guidance, num_steps=num_steps)
        for i in range(0, len(noise), batch)
    ]
    return torch.cat(parts).double()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())


def measure(net, gnet, guidance, noise, labels, ref_steps) -> tuple[list, float]:
    """Rows (sampler, steps, nfe, rms error) and the reference's own error estimate (vs half its steps)."""
    ref = sample(net, gnet, guidance, "heun", ref_steps, noise, labels)
    ref_half = sample(net, gnet, guidance, "heun", ref_steps // 2, noise, labels)
    rows = []
    for sampler, steps_for in STEPS_FOR_NFE.items():
        for target in NFE_TARGETS:
            steps = steps_for(target)
            nfe = sampling.count_evaluations(sampler, guided=False, num_steps=steps)["net"]
            rows.append((sampler, steps, nfe, rms(sample(net, gnet, guidance, sampler, steps, noise, labels), ref)))
    return rows, rms(ref_half, ref)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], results.items()):
        for sampler, marker in zip(STEPS_FOR_NFE, "osd"):
            pts = [(nfe, err) for name, _, nfe, err in rows if name == sampler]
            ax.plot(*zip(*pts), marker=marker, label=sampler)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(NFE_TARGETS, [str(n) for n in NFE_TARGETS])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations per image (NFE, main network)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("RMS error vs. converged solution (pixels in [-1, 1])")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"Saved {path}")


@click.command()
@click.option("--workdir", help="Keep the training run here and reuse it  [default: a temporary folder]", default=None)
@click.option("--kimg", help="Training duration in Ki images", type=int, default=24, show_default=True)
@click.option("--guide-kimg", help="Snapshot (Ki images) that guides", type=int, default=8, show_default=True)
@click.option("--guidance", help="Guidance strength", type=float, default=2.0, show_default=True)
@click.option("--images", help="Images per measurement", type=int, default=16, show_default=True)
@click.option("--ref-steps", help="Heun steps of the converged solution", type=int, default=256, show_default=True)
@click.option("--threads", help="torch threads", type=int, default=1, show_default=True)
@click.option("--plot", "plot_path", help="Save the figure here (PNG)", default=None)
def main(workdir, kimg, guide_kimg, guidance, images, ref_steps, threads, plot_path):
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        run_dir = train(workdir, kimg, guide_kimg, threads)
        net, gnet = load_net(_snapshot(run_dir, kimg)), load_net(_snapshot(run_dir, guide_kimg))
    rnd = sampling.StackedRandomGenerator("cpu", range(images))
    noise = rnd.randn([images, net.img_channels, net.img_resolution, net.img_resolution])
    labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[images])]

    results = {}
    for title, w in [("no guidance", 1.0), (f"autoguidance w={guidance:g} (snapshot at {guide_kimg}Ki)", guidance)]:
        start = time.time()
        rows, ref_err = measure(net, gnet, w, noise, labels, ref_steps)
        results[title] = rows
        print(f"\n{title}: reference Heun {ref_steps} steps (vs. {ref_steps // 2} steps: RMS {ref_err:.1e})")
        print("| sampler | steps | NFE | RMS error |")
        print("| --- | ---: | ---: | ---: |")
        for sampler, steps, nfe, err in rows:
            print(f"| {sampler} | {steps} | {nfe} | {err:.2e} |")
        print(f"({time.time() - start:.0f} s)")
    if plot_path:
        plot(results, plot_path)


if __name__ == "__main__":
    main()
