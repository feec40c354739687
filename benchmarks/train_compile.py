"""Benchmark: one training optimisation step (EDM2 loss, forward, backward, Adam) eagerly against the
training loop's compiled network (``training_loop(compile=True)``), and the one-time compile cost.

Network: ``Precond`` res 32, 32 channels, channel_mult [1,2,2], 2 blocks, attention at 16x16 and 8x8,
float32, training mode. Eager and compiled steps alternate, so that load from other processes on a
shared machine affects both alike; prints the best step time of each after a warm-up step and the
largest weight difference after all steps (both copies start equal and see the same data).

    python benchmarks/train_compile.py --threads 1
    python benchmarks/train_compile.py --res 8 --channels 8 --batch 2 --steps 2   # smoke run
"""

import copy
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import networks_edm2, training_loop  # noqa: E402


def step(forward, net, optimizer, images, labels, seed: int) -> float:
    """Seconds for one optimisation step."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    optimizer.zero_grad(set_to_none=True)
    training_loop.EDM2Loss()(forward, images, labels).mean().backward()
    optimizer.step()
    return time.perf_counter() - start


@click.command()
@click.option("--res", type=int, default=32, show_default=True)
@click.option("--channels", type=int, default=32, show_default=True)
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps of each after the warm-up")
@click.option("--threads", type=int, default=1, show_default=True)
def main(res: int, channels: int, batch: int, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eager = networks_edm2.Precond(
        img_resolution=res,
        img_channels=3,
        label_dim=10,
        model_channels=channels,
        channel_mult=[1, 2, 2],
        num_blocks=2,
        attn_resolutions=[res // 2, res // 4],
    ).train()
    compiled = copy.deepcopy(eager)
    forward = training_loop._compiled_training_net(compiled, compiled)
    optimizers = [torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.9, 0.99)) for n in (eager, compiled)]
    images, labels = torch.randn([batch, 3, res, res]), torch.eye(10)[torch.arange(batch) % 10]
    print(f"{sum(p.numel() for p in eager.parameters()) / 1e6:.2f} M parameters, batch {batch}, {threads} thread(s)")
    times = {"eager": [], "compiled": []}
    for i in range(steps + 1):
        times["eager"].append(step(eager, eager, optimizers[0], images, labels, seed=i))
        times["compiled"].append(step(forward, compiled, optimizers[1], images, labels, seed=i))
        if i == 0:
            print(f"compile + first step: {times['compiled'][0]:.1f} s (eager first step {times['eager'][0]:.2f} s)")
    best = {name: min(t[1:]) for name, t in times.items()}
    diff = max((a - b).abs().max().item() for a, b in zip(eager.parameters(), compiled.parameters()))
    print(
        f"step eager {best['eager']:.3f} s, compiled {best['compiled']:.3f} s, "
        f"speed-up {best['eager'] / best['compiled']:.2f}x, max weight diff {diff:.1e}"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
