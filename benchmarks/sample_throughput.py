"""Benchmark: sampling throughput with and without the eval-mode weight cache of MPConv.

Builds a small randomly initialised ``Precond`` stored in float16 (as loaded snapshots are), runs
the EDM sampler at each batch size with ``training.networks_edm2.set_inference_cache`` off
("before": every call re-normalises every weight) and on ("after": normalised weights are reused
until the weights change), and prints images/s and the largest output difference.

    python benchmarks/sample_throughput.py
    python benchmarks/sample_throughput.py --res=64 --channels=64 --batches=1,16,64 --steps=32
"""

import os
import sys
import time
from typing import List

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generate_images as gi  # noqa: E402
from training import networks_edm2  # noqa: E402


def build_net(res: int, channels: int, label_dim: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=res, img_channels=3, label_dim=label_dim, model_channels=channels,
                                channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[res // 4])
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)  # non-zero output and modulation gains, as in a trained model
    return net.eval().requires_grad_(False).half().to(device)


def make_inputs(net: torch.nn.Module, batch: int, device: torch.device):
    rnd = gi.StackedRandomGenerator(device, list(range(batch)))
    noise = rnd.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch], device=device)]
    return noise, labels


def run_sampler(net: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int, cache: bool):
    """Seconds for one sampler run with the cache on or off, and its output."""
    networks_edm2.set_inference_cache(cache)
    sync = torch.cuda.synchronize if noise.device.type == 'cuda' else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = gi.edm_sampler(net, noise, labels, num_steps=steps)
        sync()
    return time.perf_counter() - start, out


@click.command()
@click.option('--res', help='Image resolution', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--channels', help='model_channels', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--batches', help='Batch sizes', type=gi.IntListParam(), default='1,16', show_default=True)
@click.option('--steps', help='Sampler steps', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--repeats', help='Timed runs per setting (best is kept)', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--device', help='cuda or cpu  [default: cuda if available]', type=str, default=None)
@click.option('--threads', help='CPU threads for torch  [default: torch default]', type=click.IntRange(min=1), default=None)
def main(res: int, channels: int, batches: List[int], steps: int, repeats: int, device: str, threads: int) -> None:
    """Images/s of the EDM sampler with the inference cache off (before) and on (after)."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads is not None:
        torch.set_num_threads(threads)
    net = build_net(res, channels, label_dim=10, device=device)
    params = sum(p.numel() for p in net.parameters())
    print(f'device={device} threads={torch.get_num_threads()} res={res} channels={channels} '
          f'params={params / 1e6:.2f}M steps={steps} (net evals per image: {2 * steps - 1})')
    print()
    print('| batch | cache off (img/s) | cache on (img/s) | speed-up | max abs diff |')
    print('| ---: | ---: | ---: | ---: | ---: |')
    old = networks_edm2.set_inference_cache(False)
    try:
        for batch in batches:
            noise, labels = make_inputs(net, batch, device)
            run_sampler(net, noise, labels, steps, cache=False)  # warm-up
            run_sampler(net, noise, labels, steps, cache=True)
            # Alternate the two settings and keep the best time of each, so that load from other
            # processes on a shared machine affects both alike.
            best = {False: float('inf'), True: float('inf')}
            outputs = {}
            for _ in range(repeats):
                for cache in (False, True):
                    seconds, outputs[cache] = run_sampler(net, noise, labels, steps, cache)
                    best[cache] = min(best[cache], seconds)
            diff = float((outputs[True] - outputs[False]).abs().max())
            print(f'| {batch} | {batch / best[False]:.2f} | {batch / best[True]:.2f} | '
                  f'{best[False] / best[True]:.2f}x | {diff:.1e} |', flush=True)
    finally:
        networks_edm2.set_inference_cache(old)


if __name__ == '__main__':
    main()
