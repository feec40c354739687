"""Benchmark: sampling throughput of the plain eager network against the same network under
``torch.compile``.

Builds a small randomly initialised ``Precond`` (res 32, 32 channels, channel_mult [1,2,2], 2 blocks,
attention at 16x16 and 8x8), runs the EDM sampler at each batch size eagerly ("eager") and through
``torch.compile(net, fullgraph=True)`` ("compiled"), in alternating rounds so that load from other
processes on a shared machine affects both alike, and prints steady-state images/s (best round
after a warm-up run), the one-time compile cost and the largest output difference.

    python benchmarks/sample_throughput.py --threads 1
    python benchmarks/sample_throughput.py --threads 2 --batches=1,16 --steps=8
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generate_images as gi  # noqa: E402
from training import networks_edm2  # noqa: E402


def build_net(res: int, channels: int, label_dim: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = networks_edm2.Precond(
        img_resolution=res,
        img_channels=3,
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
    return net.eval().requires_grad_(False).to(device)


def make_inputs(net: torch.nn.Module, batch: int, device: torch.device):
    rnd = gi.StackedRandomGenerator(device, list(range(batch)))
    noise = rnd.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch], device=device)]
    return noise, labels


def run_sampler(net, noise: torch.Tensor, labels: torch.Tensor, steps: int):
    """Seconds for one sampler run, and its output."""
    sync = torch.cuda.synchronize if noise.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = gi.edm_sampler(net, noise, labels, num_steps=steps)
        sync()
    return time.perf_counter() - start, out


@click.command()
@click.option("--res", help="Image resolution", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--channels", help="model_channels", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--batches", help="Batch sizes", type=gi.IntListParam(), default="16", show_default=True)
@click.option("--steps", help="Sampler steps", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--repeats",
    help="Timed rounds per setting (best is kept)",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
)
@click.option("--device", help="cuda or cpu  [default: cuda if available]", type=str, default=None)
@click.option(
    "--threads", help="CPU threads for torch  [default: torch default]", type=click.IntRange(min=1), default=None
)
def main(res: int, channels: int, batches: list[int], steps: int, repeats: int, device: str, threads: int) -> None:
    """Images/s of the EDM sampler, eager vs torch.compile."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is not None:
        torch.set_num_threads(threads)
    net = build_net(res, channels, label_dim=10, device=device)
    compiled = torch.compile(net, fullgraph=True)
    params = sum(p.numel() for p in net.parameters())
    print(
        f"device={device} threads={torch.get_num_threads()} res={res} channels={channels} "
        f"params={params / 1e6:.2f}M steps={steps} (net evals per image: {2 * steps - 1})"
    )
    print()
    print("| batch | eager fp32 (img/s) | compiled fp32 (img/s) | speed-up | compile + first run (s) | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in batches:
        noise, labels = make_inputs(net, batch, device)
        run_sampler(net, noise, labels, steps)  # warm-up
        compile_seconds, _ = run_sampler(compiled, noise, labels, steps)  # compiles (once per batch shape)
        best = {"eager": float("inf"), "compiled": float("inf")}
        outputs = {}
        for _ in range(repeats):
            for name, fn in (("eager", net), ("compiled", compiled)):
                seconds, outputs[name] = run_sampler(fn, noise, labels, steps)
                best[name] = min(best[name], seconds)
        diff = float((outputs["eager"] - outputs["compiled"]).abs().max())
        print(
            f"| {batch} | {batch / best['eager']:.2f} | {batch / best['compiled']:.2f} | "
            f"{best['eager'] / best['compiled']:.2f}x | {compile_seconds:.1f} | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
