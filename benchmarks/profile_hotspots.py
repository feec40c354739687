"""Where the time goes: torch.profiler of one training step and one sampling step of the benchmark
network on the CPU, grouped by what the time is spent on; then micro-benchmarks of the candidate
replacements for the optimizer, the EMA update and the attention.

The benchmark network is ``Precond`` res 32, 32 channels, channel_mult [1,2,2], 2 blocks, attention at
16x16 and 8x8, 10 classes, batch 16. The training step is training_loop's: a batch from
``ImageFolderDataset`` through a DataLoader, EDM2Loss forward and backward, force-finite gradients,
Adam with betas (0.9, 0.99) and eps 1e-8, and the two-profile PowerFunctionEMA update. The sampling
step is one Heun step (two network evaluations). Groups are marked with record_function ranges by
wrapping the network's functions in this script (the library is not changed); backward time is
charged to the group of the forward op that the autograd node belongs to (sequence numbers).

    python benchmarks/profile_hotspots.py --threads 1
    python benchmarks/profile_hotspots.py --threads 2 --workers 2
"""

import contextlib
import os
import statistics
import sys
import tempfile
import time

import click
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sample_throughput import build_net  # noqa: E402

from training import networks_edm2  # noqa: E402

GROUPS = [
    "weight normalisation (MPConv)",
    "convolutions + linear (MPConv)",
    "attention einsums",
    "mp_silu / mp_sum / mp_cat",
    "activation normalisation (pixel, q/k/v)",
    "resample",
    "loss, preconditioning, rest of the network",
    "force-finite gradients",
    "optimizer step (Adam)",
    "EMA update",
    "data loading",
]


# ----------------------------------------------------------------------------
# Instrumentation: the network's functions wrapped in record_function ranges.


def _labelled(fn, label):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def instrumented_network():
    """Patches networks_edm2 (module functions and MPConv.forward) and torch.einsum for the duration."""
    orig = {name: getattr(networks_edm2, name) for name in ("normalize", "resample", "mp_silu", "mp_sum", "mp_cat")}
    orig_forward = networks_edm2.MPConv.forward
    orig_einsum = torch.einsum
    normalize = orig["normalize"]

    def mpconv_forward(self, x, gain=1):  # MPConv.forward, split into its two parts
        with record_function(GROUPS[0]):
            w = self.weight.to(torch.float32)
            if self.training:
                with torch.no_grad():
                    self.weight.copy_(normalize(w))
            w = normalize(w)
            w = w * (gain / np.sqrt(w[0].numel()))
            w = w.to(x.dtype)
        with record_function(GROUPS[1]):
            if w.ndim == 2:
                return x @ w.t()
            return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

    try:
        networks_edm2.normalize = _labelled(normalize, GROUPS[4])
        networks_edm2.resample = _labelled(orig["resample"], GROUPS[5])
        for name in ("mp_silu", "mp_sum", "mp_cat"):
            setattr(networks_edm2, name, _labelled(orig[name], GROUPS[3]))
        networks_edm2.MPConv.forward = mpconv_forward
        torch.einsum = _labelled(orig_einsum, GROUPS[2])
        yield
    finally:
        for name, fn in orig.items():
            setattr(networks_edm2, name, fn)
        networks_edm2.MPConv.forward = orig_forward
        torch.einsum = orig_einsum


def group_times(prof) -> dict:
    """Self CPU time (s) per (group, 'fwd'/'bwd'), on the main thread; ungrouped time goes to the rest."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    main_thread = max(
        {e.thread for e in events}, key=lambda t: sum(e.self_cpu_time_total for e in events if e.thread == t)
    )

    def label_of(e):
        while e is not None:
            if e.name in GROUPS:
                return e.name
            e = e.cpu_parent
        return None

    # A forward op is recorded with the sequence number of the next autograd node; the node with that
    # number is made by the last op (in start time) that carries it.
    def backward_node(e):
        while e is not None and not e.name.startswith("autograd::engine::evaluate_function"):
            e = e.cpu_parent
        return e

    last_op = {}
    for e in events:
        if e.sequence_nr >= 0 and e.thread == main_thread and backward_node(e) is None:
            if e.sequence_nr not in last_op or e.time_range.start >= last_op[e.sequence_nr].time_range.start:
                last_op[e.sequence_nr] = e
    seq_label = {seq: label_of(e) for seq, e in last_op.items() if label_of(e) is not None}
    times = {}
    for e in events:
        if e.name in GROUPS:
            continue  # the ranges themselves: their self time is the Python wrapper's (charged to the group)
        phase, lab = "fwd", label_of(e)
        node = backward_node(e)
        if node is not None:
            phase = "bwd"
            lab = seq_label.get(node.sequence_nr, lab)
        lab = lab or GROUPS[6]
        times[(lab, phase)] = times.get((lab, phase), 0.0) + e.self_cpu_time_total / 1e6
    for e in events:  # Python overhead inside the ranges
        if e.name in GROUPS:
            times[(e.name, "fwd")] = times.get((e.name, "fwd"), 0.0) + e.self_cpu_time_total / 1e6
    return times


def print_groups(title: str, times: dict, wall: float) -> None:
    total = sum(times.values())
    print(f"\n{title}: wall {wall * 1e3:.0f} ms, profiled CPU time {total * 1e3:.0f} ms (main thread + workers)\n")
    print("| group | forward (ms) | backward (ms) | share |")
    print("| --- | ---: | ---: | ---: |")
    for g in GROUPS:
        f, b = times.get((g, "fwd"), 0.0), times.get((g, "bwd"), 0.0)
        if f + b > 0:
            print(f"| {g} | {f * 1e3:.1f} | {b * 1e3:.1f} | {100 * (f + b) / total:.1f}% |")


# ----------------------------------------------------------------------------
# The steps that are profiled.


def make_training(batch: int, workers: int, tmp: str):
    from tests.scripts.train_helpers import random_dataset_zip
    from torch_utils import misc
    from training import dataset, encoders, phema, training_loop

    path = random_dataset_zip(os.path.join(tmp, "data.zip"), num_images=256, resolution=32, num_classes=10)
    ds = dataset.ImageFolderDataset(path=path, use_labels=True)
    loader = torch.utils.data.DataLoader(
        dataset=ds,
        sampler=misc.InfiniteSampler(dataset=ds, seed=0),
        batch_size=batch,
        num_workers=workers,
        prefetch_factor=2 if workers > 0 else None,
    )
    it = iter(loader)
    encoder = encoders.StandardRGBEncoder()
    net = build_net(32, 32, label_dim=10, device=torch.device("cpu"), train=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    ema = phema.PowerFunctionEMA(net, stds=(0.050, 0.100))
    loss_fn = training_loop.EDM2Loss()
    state = dict(nimg=0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with record_function(GROUPS[10]):
            images, labels = next(it)
            images = encoder.encode_latents(images)
        loss = loss_fn(net=net, images=images, labels=labels)
        loss.sum().mul(1 / batch).backward()
        with record_function(GROUPS[7]):
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
        with record_function(GROUPS[8]):
            optimizer.step()
        state["nimg"] += batch
        with record_function(GROUPS[9]):
            ema.update(cur_nimg=state["nimg"], batch_size=batch)

    return step


def make_sampling(batch: int):
    net = build_net(32, 32, label_dim=10, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn([batch, 3, 32, 32], generator=gen) * 10
    labels = torch.eye(10)[torch.randint(10, [batch], generator=gen)]
    t_cur, t_next = torch.tensor(10.0), torch.tensor(5.0)

    def step():  # one Heun step of edm_sampler
        with torch.no_grad():
            d_cur = (x - net(x, t_cur, labels)) / t_cur
            x_next = x + (t_next - t_cur) * d_cur
            d_prime = (x_next - net(x_next, t_next, labels)) / t_next
            return x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)

    return step


def profile_step(step, repeats: int):
    for _ in range(2):
        step()  # warm-up
    with instrumented_network():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            wall = (time.perf_counter() - start) / repeats
    times = {k: v / repeats for k, v in group_times(prof).items()}
    return times, wall


# ----------------------------------------------------------------------------
# Micro-benchmarks of the candidates.


def timeit(fns: dict, rounds: int, number: int) -> dict:
    """Median CPU seconds (of this process, all threads) per call of each function, the functions
    alternating round by round. CPU time, unlike wall time, hardly depends on load from other processes."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.process_time()
            for _ in range(number):
                fn()
            times[k].append((time.process_time() - start) / number)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_optimizer(rounds: int) -> None:
    """Adam default (a loop over the parameters on the CPU) vs foreach vs fused, on identical gradients."""
    base = build_net(32, 32, label_dim=10, device=torch.device("cpu"), train=True)
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in base.parameters()] for _ in range(3)]
    runs = {}
    for name, kw in (("default", {}), ("foreach=True", dict(foreach=True)), ("fused=True", dict(fused=True))):
        params = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, **kw)
        state = dict(i=0)

        def step(params=params, opt=opt, state=state):
            for p, g in zip(params, grads[state["i"] % len(grads)]):
                p.grad = g
            opt.step()
            state["i"] += 1

        runs[name] = (step, params, state)
    times = timeit({k: v[0] for k, v in runs.items()}, rounds, number=10)
    # Equality: 20 steps of each from the same start on the same gradients.
    finals = {}
    for name, kw in (("default", {}), ("foreach=True", dict(foreach=True)), ("fused=True", dict(fused=True))):
        params = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, **kw)
        for i in range(20):
            for p, g in zip(params, grads[i % len(grads)]):
                p.grad = g
            opt.step()
        finals[name] = params
    print("\nAdam step (benchmark network, 1.77M parameters in", len(grads[0]), "tensors)\n")
    print("| Adam | CPU ms/step | speed-up | max abs diff of the weights vs default (20 steps) |")
    print("| --- | ---: | ---: | ---: |")
    ref_params = finals["default"]
    for name in runs:
        diff = max(float((a - b).detach().abs().max()) for a, b in zip(ref_params, finals[name]))
        print(f"| {name} | {times[name] * 1e3:.2f} | {times['default'] / times[name]:.2f}x | {diff:.1e} |")


def bench_ema(rounds: int) -> None:
    """PowerFunctionEMA.update (a loop of lerp_) vs one torch._foreach_lerp_ per profile."""
    from train_throughput import foreach_ema_update

    from training import phema

    net = build_net(32, 32, label_dim=10, device=torch.device("cpu"), train=True)
    ema_loop = phema.PowerFunctionEMA(net, stds=(0.050, 0.100))
    ema_foreach = phema.PowerFunctionEMA(net, stds=(0.050, 0.100))
    counters = dict(loop=0, foreach=0)

    def upd_loop():
        counters["loop"] += 16
        ema_loop.update(cur_nimg=counters["loop"], batch_size=16)

    def upd_foreach():
        counters["foreach"] += 16
        foreach_ema_update(ema_foreach, counters["foreach"], 16)

    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # so that the averages move
    times = timeit({"loop (as now)": upd_loop, "torch._foreach_lerp_": upd_foreach}, rounds, number=10)
    # Compare after the same number of updates.
    while counters["foreach"] < counters["loop"]:
        upd_foreach()
    while counters["loop"] < counters["foreach"]:
        upd_loop()
    diff = max(
        float((a - b).abs().max())
        for ea, eb in zip(ema_loop.emas, ema_foreach.emas)
        for a, b in zip(ea.parameters(), eb.parameters())
    )
    print("\nEMA update (two profiles)\n")
    print("| EMA update | CPU ms/update | speed-up | max abs diff |")
    print("| --- | ---: | ---: | ---: |")
    base = times["loop (as now)"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.2f} | {base / t:.2f}x | {diff if 'foreach' in name else 0.0:.1e} |")


def bench_attention(rounds: int, batch: int) -> None:
    """The network's two einsums vs scaled_dot_product_attention, on its attention shapes (one head
    of 64 channels), forward only (sampling) and forward + backward (training)."""
    print("\nAttention (one head of 64 channels, q/k/v normalised as in Block)\n")
    print("| tokens | pass | einsum (CPU ms) | SDPA (CPU ms) | SDPA speed-up | max abs diff |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for res in (16, 8):
        gen = torch.Generator().manual_seed(3)
        y = torch.randn([batch, 1, 64, 3, res * res], generator=gen)
        q, k, v = networks_edm2.normalize(y, dim=2).unbind(3)

        def einsum_attn(q, k, v):
            w = torch.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            return torch.einsum("nhqk,nhck->nhcq", w, v)

        def sdpa_attn(q, k, v):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)
            )
            return out.transpose(2, 3)

        with torch.no_grad():
            diff = float((einsum_attn(q, k, v) - sdpa_attn(q, k, v)).abs().max())
        for pass_name in ("forward", "forward+backward"):
            if pass_name == "forward":

                def make(fn, q=q, k=k, v=v):
                    def run():
                        with torch.no_grad():
                            fn(q, k, v)

                    return run
            else:
                qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

                def make(fn, qg=qg, kg=kg, vg=vg):
                    def run():
                        fn(qg, kg, vg).sum().backward()

                    return run

            times = timeit({"einsum": make(einsum_attn), "sdpa": make(sdpa_attn)}, rounds, number=5)
            print(
                f"| {res * res} | {pass_name} | {times['einsum'] * 1e3:.2f} | {times['sdpa'] * 1e3:.2f} | "
                f"{times['einsum'] / times['sdpa']:.2f}x | {diff:.1e} |"
            )


@click.command()
@click.option("--batch", help="Batch size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--repeats", help="Profiled steps (averaged)", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--rounds", help="Micro-benchmark rounds", type=click.IntRange(min=1), default=7, show_default=True)
@click.option(
    "--workers",
    help="DataLoader workers (0: the loading is profiled in this process; training_loop uses 2)",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
)
@click.option(
    "--threads", help="CPU threads for torch  [default: torch default]", type=click.IntRange(min=1), default=None
)
@click.option("--skip-micro", help="Profiles only", is_flag=True, default=False)
def main(batch: int, repeats: int, rounds: int, workers: int, threads: int, skip_micro: bool) -> None:
    """Profile one training step and one sampling step, grouped; micro-benchmark the candidates."""
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"threads={torch.get_num_threads()} batch={batch} DataLoader workers={workers}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        times, wall = profile_step(make_training(batch, workers, tmp), repeats)
        print_groups("Training step", times, wall)
    times, wall = profile_step(make_sampling(batch), repeats)
    print_groups("Sampling step (one Heun step = 2 network evaluations)", times, wall)
    if not skip_micro:
        bench_optimizer(rounds)
        bench_ema(rounds)
        bench_attention(rounds, batch)


if __name__ == "__main__":
    main()
