"""One short check of the GPU paths (a few minutes on one GPU): prints one table, writes JSON.

  (a) training steps of a small network and of edm2-img512-xs at batch 32 in fp32, fp32 + TF32,
      fp16 (the network's use_fp16) and bf16 (misc.autocast), eager and compiled the way
      training_loop(compile=True) compiles: images/s, peak memory and the loss relative to fp32;
  (b) sampling with edm2-img512-xs-sized random weights at batch 32 in the same precisions,
      eager and compiled (misc.CompiledNetwork): images/s and the largest difference from the
      fp32 eager images;
  (c) a one-process NCCL group through torch_utils.distributed.init();
  (d) count_flops on CUDA (memory per sample);
  (e) the network's attention einsums vs scaled_dot_product_attention (flash / memory-efficient
      kernels) on its attention shapes, fp16 and bf16: time per call and the largest difference,
      the evidence for or against SDPA on GPUs (on a CPU it is slower, see docs/performance.md).

On a machine without CUDA it says so and exits 0. Compiled rows that would start after
``--budget`` seconds are skipped (and say so), so that the whole check stays under 8 minutes.

    python benchmarks/gpu_check.py --out=gpu_check.json
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NETS = {  # name: Precond keyword arguments
    "small": dict(
        img_resolution=32,
        img_channels=3,
        label_dim=10,
        model_channels=32,
        channel_mult=[1, 2, 2],
        num_blocks=2,
        attn_resolutions=[16, 8],
    ),
    "edm2-img512-xs": dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128),
}


PRECISIONS = ["fp32", "tf32", "fp16", "bf16"]  # tf32 = fp32 with TF32 matmuls and convolutions


def build(name: str, precision: str, device: torch.device) -> torch.nn.Module:
    from torch_utils import misc
    from training import networks_edm2

    misc.resolve_precision(precision.replace("tf32", "fp32"), False, device, tf32=(precision == "tf32"))
    misc.set_tf32(precision == "tf32")
    torch.manual_seed(0)
    net = networks_edm2.Precond(**NETS[name], use_fp16=(precision == "fp16")).to(device)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net


def timed(fn, device: torch.device, repeats: int):
    cuda = device.type == "cuda"  # a CPU runs it too, for a smoke test of this script
    fn()  # warm-up (compiles, if compiled)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return (time.perf_counter() - start) / repeats, out, peak


def train_row(name: str, precision: str, compiled: bool, device: torch.device, batch: int = 32) -> dict:
    from torch_utils import misc
    from training import training_loop

    net = build(name, precision, device).train()
    fn_net = training_loop._compiled_training_net(net, net) if compiled else net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))
    gen = torch.Generator(device).manual_seed(1)
    k = NETS[name]
    images = torch.randn(
        [batch, k["img_channels"], k["img_resolution"], k["img_resolution"]], device=device, generator=gen
    )
    labels = torch.eye(k["label_dim"], device=device)[torch.arange(batch, device=device) % k["label_dim"]]
    loss_fn = training_loop.EDM2Loss()

    def step():
        torch.manual_seed(2)
        optimizer.zero_grad(set_to_none=True)
        with misc.autocast(precision):
            loss = loss_fn(fn_net, images, labels).sum() / batch
        loss.backward()
        optimizer.step()
        return loss.detach()

    seconds, loss, peak = timed(step, device, repeats=5)
    return dict(
        part="train",
        net=name,
        precision=precision,
        compiled=compiled,
        img_per_s=batch / seconds,
        peak_gb=peak,
        loss=float(loss),
    )


def sample_row(precision: str, compiled: bool, device: torch.device, reference=None, batch: int = 32) -> dict:
    import generate_images as gi
    from torch_utils import misc

    net = build("edm2-img512-xs", precision, device).eval().requires_grad_(False)
    fn_net = misc.CompiledNetwork(net) if compiled else net
    rnd = gi.StackedRandomGenerator(device, list(range(batch)))
    noise = rnd.randn([batch, 4, 64, 64], device=device)
    labels = torch.eye(1000, device=device)[rnd.randint(1000, size=[batch], device=device)]

    def run():
        with torch.no_grad(), misc.autocast(precision):
            return gi.edm_sampler(fn_net, noise, labels, num_steps=8).float()

    seconds, out, peak = timed(run, device, repeats=2)
    diff = float((out - reference).abs().max()) if reference is not None else 0.0
    return dict(
        part="sample",
        net="edm2-img512-xs",
        precision=precision,
        compiled=compiled,
        img_per_s=batch / seconds,
        peak_gb=peak,
        max_diff_vs_fp32=diff,
    ), out


def attention_rows(device: torch.device, batch: int = 32, channels: int = 768, heads: int = 12) -> list:
    """The network's two einsums (training/networks_edm2.py Block) vs SDPA, on [N, heads, C, tokens]."""
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for tokens in (256, 64):  # attention at 16x16 and 8x8
            q, k, v = torch.randn([3, batch, heads, channels // heads, tokens], device=device, dtype=dtype).unbind(0)

            def einsum(q=q, k=k, v=v):
                w = torch.einsum("nhcq,nhck->nhqk", q, k / (q.shape[2] ** 0.5)).softmax(dim=3)
                return torch.einsum("nhqk,nhck->nhcq", w, v)

            def sdpa(q=q, k=k, v=v):
                t = [a.transpose(2, 3) for a in (q, k, v)]  # SDPA wants [N, heads, tokens, C]
                return torch.nn.functional.scaled_dot_product_attention(*t).transpose(2, 3)

            (t_e, y_e, _), (t_s, y_s, _) = timed(einsum, device, 20), timed(sdpa, device, 20)
            rows.append(
                dict(
                    part="attention",
                    dtype=str(dtype).split(".")[-1],
                    tokens=tokens,
                    einsum_ms=t_e * 1e3,
                    sdpa_ms=t_s * 1e3,
                    speedup=t_e / t_s,
                    max_diff=float((y_e.float() - y_s.float()).abs().max()),
                )
            )
    return rows


@click.command()
@click.option("--out", help="Write the results as JSON here", metavar="FILE", type=str, default=None)
@click.option("--budget", help="Skip compiled rows that would start later (seconds)", type=float, default=360.0)
def main(out, budget):
    """Check fp32/TF32/fp16/bf16 training, sampling, NCCL and count_flops on one GPU."""
    if not torch.cuda.is_available():
        print("No GPU is present (torch.cuda.is_available() is False); nothing to check.")
        return
    device = torch.device("cuda")
    start, rows = time.perf_counter(), []
    precisions = PRECISIONS if torch.cuda.is_bf16_supported() else PRECISIONS[:3]

    def over_budget(part, compiled, **fields):
        if compiled and time.perf_counter() - start > budget:
            rows.append(dict(part=part, compiled=True, skipped=f"over the {budget:g} s budget", **fields))
            return True
        return False

    for compiled in (False, True):
        for name in NETS:
            for precision in precisions:
                if not over_budget("train", compiled, net=name, precision=precision):
                    rows.append(train_row(name, precision, compiled, device))
    reference = None
    for compiled in (False, True):
        for precision in precisions:
            if not over_budget("sample", compiled, net="edm2-img512-xs", precision=precision):
                row, images = sample_row(precision, compiled, device, reference)
                reference = images if reference is None else reference
                rows.append(row)
    from torch_utils import misc

    misc.set_tf32(False)

    from torch_utils import distributed as dist

    dist.init()
    t = torch.ones([4], device=device)
    torch.distributed.all_reduce(t)
    rows.append(
        dict(
            part="nccl",
            backend=torch.distributed.get_backend(),
            world_size=dist.get_world_size(),
            ok=bool(torch.equal(t, torch.ones_like(t))),
        )
    )

    import count_flops as cf

    result = cf.count_flops(build("edm2-img512-xs", "fp16", device), device="cuda")
    rows.append(
        dict(part="count_flops", net="edm2-img512-xs", gflops=result.gflops, memory_mib=result.memory_bytes / 2**20)
    )

    rows += attention_rows(device)

    fp32_loss = {
        (r["net"], r["compiled"]): r["loss"]
        for r in rows
        if r["part"] == "train" and r["precision"] == "fp32" and "loss" in r
    }
    for r in rows:
        if r["part"] == "train" and "loss" in r and (r["net"], r["compiled"]) in fp32_loss:
            r["loss_rel_fp32"] = abs(r["loss"] - fp32_loss[(r["net"], r["compiled"])]) / abs(
                fp32_loss[(r["net"], r["compiled"])]
            )
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if out is not None:
        import dnnlib

        with dnnlib.util.atomic_write(out, mode="w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
