"""Benchmark: sampling throughput of the plain eager network against faster ways of running it.

Builds a small randomly initialised ``Precond`` (res 32, 32 channels, channel_mult [1,2,2], 2 blocks,
attention at 16x16 and 8x8), runs the EDM sampler at each batch size with each variant, in
alternating rounds so that load from other processes on a shared machine affects all alike, and
prints the median steady-state images/s (after a warm-up run), also per CPU-second of this process
(with one thread, nearly independent of load from other processes), the one-time compile cost and
the largest output difference from the eager network.

Variants (``--variants``, comma-separated):

    eager           the network as it is, float32 (the reference's speed)
    pre             eager, with every MPConv's eval-mode weight precomputed once (a prototype)
    cl              eager, channels_last memory format for weights and activations (a prototype)
    compiled        torch.compile(net, fullgraph=True)
    compiled-pre    torch.compile of the network with precomputed weights
    compiled-freeze torch.compile with inductor's ``freezing``, as ``generate_images(..., compile=True)`` runs it
    eager-bf16      eager under bfloat16 autocast, as ``generate_images(..., precision="bf16")`` runs it
    compiled-freeze-bf16  both: ``generate_images.py --compile --precision=bf16`` (on a CPU with native bf16)

    python benchmarks/sample_throughput.py --threads 1
    python benchmarks/sample_throughput.py --threads 2 --batches=1,16 --steps=8
"""

import copy
import os
import statistics
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generate_images as gi  # noqa: E402
from torch_utils import misc  # noqa: E402
from training import networks_edm2  # noqa: E402

VARIANTS = ["eager", "pre", "cl", "compiled", "compiled-pre", "compiled-freeze", "eager-bf16", "compiled-freeze-bf16"]
DEFAULT_VARIANTS = "eager,pre,compiled,compiled-freeze,eager-bf16,compiled-freeze-bf16"


def build_net(
    res: int, channels: int, label_dim: int, device: torch.device, img_channels: int = 3, train: bool = False
) -> torch.nn.Module:
    """The benchmark network: ``Precond`` with model_channels ``channels``, channel_mult [1,2,2], 2 blocks,
    attention at res/2 and res/4; gains set to 1 so that every layer contributes to the output."""
    torch.manual_seed(0)
    net = networks_edm2.Precond(
        img_resolution=res,
        img_channels=img_channels,
        label_dim=label_dim,
        model_channels=channels,
        channel_mult=[1, 2, 2],
        num_blocks=2,
        attn_resolutions=[res // 2, res // 4],
    )
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)  # non-zero output and modulation gains, as in a trained model
    if train:
        return net.train().requires_grad_(True).to(device)
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------
# Prototype: eval-mode weights computed once instead of on every call.


class PrecomputedMPConv(torch.nn.Module):
    """Stands in for an eval-mode ``MPConv``: holds normalize(w), computed once, and its 1/sqrt(fan_in)
    scaled copy, the weight that ``MPConv.forward`` computes on every call with gain 1. Calls with
    another gain scale normalize(w) by gain/sqrt(fan_in) as the network does, so the results are the
    network's bit for bit."""

    def __init__(self, conv: networks_edm2.MPConv):
        super().__init__()
        self.out_channels = conv.out_channels
        with torch.no_grad():
            w = networks_edm2.normalize(conv.weight.to(torch.float32))
        self.fan_in = w[0].numel()
        self.register_buffer("weight_normalized", w)
        self.register_buffer("weight", w * (1 / np.sqrt(self.fan_in)))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if isinstance(gain, (int, float)) and gain == 1:
            w = self.weight
        else:
            w = self.weight_normalized * (gain / np.sqrt(self.fan_in))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


def precompute_weights(net: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the (eval-mode) network with every MPConv replaced by a PrecomputedMPConv.
    The copy is a snapshot: later edits to ``net``'s weights do not reach it."""
    net = copy.deepcopy(net).eval().requires_grad_(False)
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, networks_edm2.MPConv):
                setattr(module, name, PrecomputedMPConv(child))
    return net


# ----------------------------------------------------------------------------


def make_inputs(net: torch.nn.Module, batch: int, device: torch.device):
    rnd = gi.StackedRandomGenerator(device, list(range(batch)))
    noise = rnd.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch], device=device)]
    return noise, labels


class ChannelsLast:
    """Runs ``net`` on channels_last inputs (its weights converted once)."""

    def __init__(self, net: torch.nn.Module):
        self.net = copy.deepcopy(net).to(memory_format=torch.channels_last)

    def __call__(self, x, sigma, labels):
        return self.net(x.contiguous(memory_format=torch.channels_last), sigma, labels).contiguous()


class BF16Autocast:
    """Each call under bfloat16 autocast (generate_images wraps its whole sampler call the same way)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, *args, **kwargs):
        with misc.autocast("bf16", x.device.type):
            return self.net(x, *args, **kwargs)


def make_variant(name: str, net: torch.nn.Module):
    if name.endswith("-bf16"):
        return BF16Autocast(make_variant(name[: -len("-bf16")], net))
    if name == "eager":
        return net
    if name == "pre":
        return precompute_weights(net)
    if name == "cl":
        return ChannelsLast(net)
    if name == "compiled":
        return torch.compile(net, fullgraph=True, dynamic=False)
    if name == "compiled-pre":
        return torch.compile(precompute_weights(net), fullgraph=True, dynamic=False)
    if name == "compiled-freeze":
        return torch.compile(copy.deepcopy(net), fullgraph=True, dynamic=False, options={"freezing": True})
    raise ValueError(f"Unknown variant {name!r}")


def run_sampler(net, noise: torch.Tensor, labels: torch.Tensor, steps: int):
    """Wall seconds and CPU seconds (of this process) for one sampler run, and its output."""
    sync = torch.cuda.synchronize if noise.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = gi.edm_sampler(net, noise, labels, num_steps=steps)
        sync()
    return time.perf_counter() - start, time.process_time() - start_cpu, out


def parse_variants(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in names if x not in VARIANTS]
    if bad or not names:
        raise click.BadParameter(f"choose from {', '.join(VARIANTS)}")
    return names if names[0] == "eager" else ["eager"] + [x for x in names if x != "eager"]


@click.command()
@click.option("--res", help="Image resolution", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--channels", help="model_channels", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--batches", help="Batch sizes", type=gi.IntListParam(), default="16", show_default=True)
@click.option("--steps", help="Sampler steps", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--repeats", help="Timed rounds per setting (median kept)", type=click.IntRange(min=1), default=5, show_default=True
)
@click.option("--variants", help="Comma-separated variants", type=str, default=DEFAULT_VARIANTS, show_default=True)
@click.option("--device", help="cuda or cpu  [default: cuda if available]", type=str, default=None)
@click.option(
    "--threads", help="CPU threads for torch  [default: torch default]", type=click.IntRange(min=1), default=None
)
def main(
    res: int, channels: int, batches: list[int], steps: int, repeats: int, variants: str, device: str, threads: int
) -> None:
    """Images/s of the EDM sampler: eager vs precomputed weights, channels_last and torch.compile."""
    names = parse_variants(variants)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is not None:
        torch.set_num_threads(threads)
    net = build_net(res, channels, label_dim=10, device=device)
    params = sum(p.numel() for p in net.parameters())
    print(
        f"device={device} threads={torch.get_num_threads()} res={res} channels={channels} "
        f"params={params / 1e6:.2f}M steps={steps} (net evals per image: {2 * steps - 1}) "
        f"repeats={repeats} (median), torch {torch.__version__}"
    )
    print()
    print(
        "| batch | variant | img/s (median) | min–max img/s | speed-up vs eager | img per CPU-s | speed-up (CPU time) "
        "| compile + first run (s) | max abs diff |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in batches:
        torch._dynamo.reset()
        noise, labels = make_inputs(net, batch, device)
        fns = {name: make_variant(name, net) for name in names}
        first = {}
        outputs = {}
        for name, fn in fns.items():  # warm-up; for the compiled ones this compiles (once per batch shape)
            first[name], _, outputs[name] = run_sampler(fn, noise, labels, steps)
        times = {name: [] for name in names}
        cpu_times = {name: [] for name in names}
        for _ in range(repeats):
            for name, fn in fns.items():
                seconds, cpu_seconds, outputs[name] = run_sampler(fn, noise, labels, steps)
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
        eager_median = statistics.median(times["eager"])
        eager_cpu = statistics.median(cpu_times["eager"])
        scale = float(outputs["eager"].abs().max())
        for name in names:
            med = statistics.median(times[name])
            cpu = statistics.median(cpu_times[name])
            diff = float((outputs["eager"] - outputs[name]).abs().max())
            compile_cell = f"{first[name]:.1f}" if "compiled" in name else "–"
            print(
                f"| {batch} | {name} | {batch / med:.2f} | {batch / max(times[name]):.2f}–{batch / min(times[name]):.2f} | "
                f"{eager_median / med:.2f}x | {batch / cpu:.2f} | {eager_cpu / cpu:.2f}x | {compile_cell} | {diff:.1e} |",
                flush=True,
            )
        print(f"(batch {batch}: largest |output| of the eager sampler {scale:.1f})", flush=True)


if __name__ == "__main__":
    main()
