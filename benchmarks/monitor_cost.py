"""Benchmark: what watching a run costs. A CPU training with a paper preset, once with the default
monitoring (TensorBoard, loss by noise level, gradient norm, sample grids within their budget) and
once with ``--no-tensorboard --grid=0``; prints the wall time of each and the share of the watched
run's wall time that monitoring took (the difference of the two, and the grid seconds the run logged).

Run: ``train_edm2.py --preset=edm2-img64-xs --channels=64 --batch=8 --duration=1024 --snapshot=1024`` on
32 random 16x16 RGB images of 4 classes that the benchmark writes, one thread. The two variants alternate
(``--repeats``), so that load from other processes on a shared machine affects both alike; the best wall
time of each counts.

    python benchmarks/monitor_cost.py
    python benchmarks/monitor_cost.py --duration 2048 --repeats 2
"""

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import zipfile

import click
import numpy as np
import PIL.Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(path: str, num_images: int = 32, resolution: int = 16, num_classes: int = 4) -> str:
    """A ZIP of random RGB images with labels ``idx % num_classes`` (dataset.json), as dataset_tool.py writes."""
    rng = np.random.RandomState(0)
    labels = []
    with zipfile.ZipFile(path, "w") as z:
        for idx in range(num_images):
            name = f"img{idx:08d}.png"
            with z.open(name, "w") as f:
                PIL.Image.fromarray(rng.randint(0, 256, size=[resolution, resolution, 3], dtype=np.uint8)).save(
                    f, "PNG"
                )
            labels.append([name, idx % num_classes])
        z.writestr("dataset.json", json.dumps(dict(labels=labels)))
    return path


def train(outdir: str, data: str, duration: int, extra: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds of one train_edm2.py run (one thread; CPU: the process and its data loaders)
    and what it printed. On a machine that other work shares, CPU seconds are what the run would take
    alone."""
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_edm2.py"), f"--outdir={outdir}", f"--data={data}"]
    cmd += ["--preset=edm2-img64-xs", "--channels=64", "--batch=8", f"--duration={duration}", "--snapshot=1024"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    usage, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if result.returncode != 0:
        raise click.ClickException(f"train_edm2.py failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds, cpu_seconds, result.stdout


@click.command()
@click.option("--duration", type=int, default=1024, show_default=True, help="Training images (multiple of 1024)")
@click.option("--repeats", type=int, default=1, show_default=True, help="Runs of each variant, alternating")
def main(duration: int, repeats: int) -> None:
    variants = {"default monitoring": [], "--no-tensorboard --grid=0": ["--no-tensorboard", "--grid=0"]}
    best = {name: [float("inf"), float("inf")] for name in variants}  # wall, CPU seconds
    grid_lines = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(os.path.join(tmp, "data.zip"))
        for repeat in range(repeats):
            for name, extra in variants.items():
                seconds, cpu_seconds, log = train(
                    os.path.join(tmp, f"run-{repeat}-{len(extra)}"), data, duration, extra
                )
                best[name] = [min(best[name][0], seconds), min(best[name][1], cpu_seconds)]
                if not extra:
                    grid_lines += [line for line in log.splitlines() if "samples-" in line or "Sample grid" in line]
    watched, plain = best["default monitoring"], best["--no-tensorboard --grid=0"]
    grid_sec = sum(float(m.group(1)) for m in map(re.compile(r" in ([\d.]+) s$").search, grid_lines) if m) / repeats
    print(f"edm2-img64-xs --channels=64 --batch=8 --duration={duration} --snapshot=1024, 1 thread, best of {repeats}")
    print(f"{'variant':<28} {'wall s':>8} {'CPU s':>8}")
    for name, (seconds, cpu_seconds) in best.items():
        print(f"{name:<28} {seconds:8.1f} {cpu_seconds:8.1f}")
    share = [(w - p) / w for w, p in zip(watched, plain)]
    print(f"monitoring share: {share[0]:.1%} of wall time, {share[1]:.1%} of CPU time (difference of the two runs)")
    print(f"grid seconds logged per run: {grid_sec:.1f} ({grid_sec / watched[1]:.1%} of its CPU time)")
    for line in grid_lines[: len(grid_lines) // repeats]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
