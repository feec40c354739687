"""Speed of post-hoc EMA reconstruction and of the safe loader against plain ``pickle.load``, at one thread.

Writes snapshot pickles of an EDM2 network the way the training loop saves them (a dict of encoder,
dataset_kwargs, loss_fn and a float16 ``ema`` in eval mode; times 8Mi images apart, two EMA lengths
each), then measures, each in a fresh process with ``torch.set_num_threads(1)`` and the modules
already imported:

* ``reconstruct_phema.reconstruct_phema`` (the library function the CLI and the tests call) on all
  inputs to three EMA lengths, saving the outputs: safely (the default) and trusting the embedded
  code (plain ``pickle.load``, as the reference tool loads). Median of ``--repeats`` processes.
* one snapshot loaded by ``persistence.safe_load`` and by ``pickle.load``: the first load of the
  process and the median of ``--loads`` further loads, alternating the two.

``--baseline=DIR`` measures another checkout of the project (e.g. an earlier commit exported with
``git archive``) on the same snapshots, in the same run, for a before/after table.

    python benchmarks/phema_speed.py                          # 64 channels: 31.3M parameters, 8 inputs
    python benchmarks/phema_speed.py --baseline=/tmp/edm2-base
    python benchmarks/phema_speed.py --channels=128           # edm2-img512-xs size (124.7M parameters)
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_STD = (0.05, 0.10, 0.15)  # The three reconstructed EMA lengths.

# ----------------------------------------------------------------------------
# What the child processes run (imported from the checkout under test).


def write_snapshots(in_dir, channels, inputs):
    """Save ``inputs`` snapshots of one network with slightly different weights; return its parameter count."""
    import copy
    import pickle

    import torch

    import dnnlib
    from training import encoders, networks_edm2, training_loop

    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=channels)
    net.eval().requires_grad_(False)
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip")
    for i in range(inputs):
        kimg, std = (i // 2 + 1) * 8 * 2**20 // 1000, ("0.050", "0.100")[i % 2]
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.01)  # Each snapshot holds other values, as in training.
        data = dnnlib.EasyDict(encoder=encoders.StandardRGBEncoder(), dataset_kwargs=dataset_kwargs)
        data.loss_fn = training_loop.EDM2Loss()
        data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
        with open(os.path.join(in_dir, f"network-snapshot-{kimg:07d}-{std}.pkl"), "wb") as f:
            pickle.dump(data, f)
    return sum(p.numel() for p in net.parameters())


def time_reconstruction(in_dir, out_dir, trust):
    """Seconds for reconstruct_phema on every input of ``in_dir`` to OUT_STD, saving into ``out_dir``."""
    import time

    import reconstruct_phema
    from training import encoders, networks_edm2, training_loop  # noqa: F401 -- imported before the clock starts

    in_pkls = reconstruct_phema.list_input_pickles(in_dir)
    start = time.perf_counter()
    steps = reconstruct_phema.reconstruct_phema(
        in_pkls, out_std=list(OUT_STD), out_dir=out_dir, verbose=False, trust_embedded_code=trust
    )
    for _ in steps:
        pass
    return time.perf_counter() - start


def time_loads(path, loads):
    """(first safe, first plain, median safe, median plain) seconds to load ``path``."""
    import pickle
    import time

    from torch_utils import persistence
    from training import encoders, networks_edm2, training_loop  # noqa: F401 -- imported before the clock starts

    def plain_load(path):
        with open(path, "rb") as f:
            return pickle.load(f)

    times = {persistence.safe_load: [], plain_load: []}
    for _ in range(loads + 1):
        for load, seconds in times.items():
            start = time.perf_counter()
            data = load(path)
            seconds.append(time.perf_counter() - start)
            del data
    safe, plain = times.values()
    return safe[0], plain[0], statistics.median(safe[1:]), statistics.median(plain[1:])


# ----------------------------------------------------------------------------
# The driver.


def run_child(root, *args):
    """Run this script's hidden ``--child`` mode with ``root`` first on the path; return its last output line
    and its peak RSS in bytes (as the kernel reports it)."""
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{out}")
    return out.strip().splitlines()[-1], usage.ru_maxrss * 1024


def measure(checkouts, in_dir, out_dir, repeats, loads):
    """checkout name -> its numbers: medians over ``repeats`` processes, the checkouts taking turns (so that
    other work on the machine slows them alike)."""
    runs = {(name, label): [] for name in checkouts for label in ("safe", "trusting")}
    for _ in range(repeats):
        for name, label in runs:
            line, rss = run_child(checkouts[name], "phema", in_dir, out_dir, label)
            runs[name, label].append((float(line), rss))
            shutil.rmtree(out_dir)
            os.makedirs(out_dir)
    results = {}
    for name in checkouts:
        results[name] = {label: statistics.median(s for s, _ in runs[name, label]) for label in ("safe", "trusting")}
        results[name]["rss"] = statistics.median(rss for _, rss in runs[name, "safe"])
    path = os.path.join(in_dir, sorted(os.listdir(in_dir))[-1])
    for name, root in checkouts.items():
        times = [float(x) for x in run_child(root, "loads", path, str(loads))[0].split()]
        results[name].update(zip(("first_safe", "first_plain", "safe_load", "plain_load"), times))
    return results


@click.command()
@click.option("--channels", help="model_channels of the network", type=int, default=64, show_default=True)
@click.option("--inputs", help="Number of input snapshots", type=int, default=8, show_default=True)
@click.option("--repeats", help="Processes per reconstruction timing (median)", type=int, default=3, show_default=True)
@click.option(
    "--loads", help="Timed loads of each kind after the first (median)", type=int, default=7, show_default=True
)
@click.option("--baseline", help="Another checkout to measure too (before/after)", type=str, default=None)
@click.option("--workdir", help="Scratch folder (default: a temporary one)", type=str, default=None)
@click.option("--child", help="(internal) run one measurement", is_flag=True, hidden=True)
@click.argument("child_args", nargs=-1)
def main(channels, inputs, repeats, loads, baseline, workdir, child, child_args):
    if child:
        import torch

        torch.set_num_threads(1)
        kind, *args = child_args
        if kind == "write":
            print(write_snapshots(args[0], int(args[1]), int(args[2])))
        elif kind == "phema":
            print(time_reconstruction(args[0], args[1], trust=args[2] == "trusting"))
        else:
            print(*time_loads(args[0], int(args[1])))
        return
    checkouts = {"this version": REPO_ROOT}
    if baseline is not None:
        checkouts = {"baseline": os.path.abspath(baseline), **checkouts}
    scratch = tempfile.mkdtemp(prefix="phema-speed-", dir=workdir)
    try:
        in_dir, out_dir = os.path.join(scratch, "in"), os.path.join(scratch, "out")
        os.makedirs(in_dir), os.makedirs(out_dir)
        num_params = int(run_child(REPO_ROOT, "write", in_dir, str(channels), str(inputs))[0])
        size = os.path.getsize(os.path.join(in_dir, sorted(os.listdir(in_dir))[0]))
        print(
            f"Network: {num_params / 1e6:.1f}M parameters, snapshot pickle {size / 2**20:.0f} MiB (float16); "
            f"{inputs} inputs -> sigma_rel {', '.join(f'{s:.3f}' for s in OUT_STD)}; one thread"
        )
        results = measure(checkouts, in_dir, out_dir, repeats, loads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(
        "| checkout | reconstruct_phema (s) | peak RSS (MiB) | trusting (s) | one load: safe / plain (s) "
        "| safe / plain | first load: safe / plain (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['safe']:.2f} | {r['rss'] / 2**20:.0f} | {r['trusting']:.2f} | "
            f"{r['safe_load']:.3f} / {r['plain_load']:.3f} | {r['safe_load'] / r['plain_load']:.2f} | "
            f"{r['first_safe']:.2f} / {r['first_plain']:.2f} |"
        )
    if baseline is not None:
        before, after = results["baseline"], results["this version"]
        print()
        print(f"Speed-up of reconstruct_phema (safe): {before['safe'] / after['safe']:.2f}x")


if __name__ == "__main__":
    main()
