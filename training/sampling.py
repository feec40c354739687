"""Sampling from trained EDM2 networks: the time steps and the EDM sampler, per-image random generators,
loading networks for sampling, and ``generate_images()``, the library function under ``generate_images.py``,
``calculate_metrics.py gen`` and the sample grids of a training run.

The sampler integrates the probability-flow ODE of Karras et al. (EDM, 2022) with Heun's
second-order method, optionally adding "churn" noise. Guidance (classifier-free guidance
or autoguidance) extrapolates from a guiding network's denoised estimate towards the main
network's. Every image draws its randomness from a generator seeded by its own seed, so a
seed gives the same noise, class and churn noise whatever the batch it lands in and however
many processes share the work.
"""

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, persistence
from torch_utils.misc import CompiledNetwork

# ----------------------------------------------------------------------------
# EDM sampler (Karras et al. 2022, Algorithm 2) with guidance.


def edm_time_steps(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} = sigma_min, followed by t_N = 0:
    t_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    # A single step starts at sigma_max (the formula would divide 0 by 0).
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def edm_sampler(
    net: Callable,
    noise: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    gnet: Optional[Callable] = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guidance: float = 1,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    dtype: torch.dtype = torch.float32,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """Solve the probability-flow ODE from x = noise * sigma_max down to sigma = 0.

    ``net(x, sigma, labels)`` is the denoiser D(x; sigma); with ``guidance != 1`` the guiding
    network's estimate is extrapolated towards it: D = D_g + guidance * (D - D_g). With
    ``guidance == 1``, or without a guiding network other than ``net`` (D_g = D gives D), the guiding
    network is never evaluated. ``randn_like`` supplies the churn noise, which must come from each
    image's own generator for per-seed determinism.
    """

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        Dx = net(x, t, labels).to(dtype)
        if guidance == 1 or gnet is None or gnet is net:
            return Dx
        ref_Dx = gnet(x, t, labels).to(dtype)
        return ref_Dx.lerp(Dx, guidance)

    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        if gamma > 0:
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat = t_cur
            x_hat = x_cur

        # Euler step from t_hat to t_next.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun's 2nd order correction (skipped on the last step, which ends at sigma = 0).
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------
# Per-image random generators, stacked along the batch dimension.


class StackedRandomGenerator:
    """One ``torch.Generator`` per image, seeded with ``seed % 2**32``. Each draw of shape
    ``[N, ...]`` takes row n from generator n, so an image's random numbers do not depend
    on which other images share its batch."""

    def __init__(self, device: Union[str, torch.device], seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check(self, size: Sequence[int]) -> None:
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(
                f"Leading dimension {list(size)[:1]} must equal the number of generators ({len(self.generators)})"
            )

    def randn(self, size: Sequence[int], **kwargs: Any) -> torch.Tensor:
        self._check(size)
        return torch.stack([torch.randn(list(size[1:]), generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args: Any, size: Sequence[int], **kwargs: Any) -> torch.Tensor:
        self._check(size)
        return torch.stack(
            [torch.randint(*args, size=list(size[1:]), generator=gen, **kwargs) for gen in self.generators]
        )


# ----------------------------------------------------------------------------
# Image generation.

load_network_pickle = persistence.load_network_pickle  # the name this module has always exported


def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """``outdir/{seed:06d}.png``, or ``outdir/{seed//1000*1000:06d}/{seed:06d}.png`` with subdirs."""
    image_dir = os.path.join(outdir, f"{seed // 1000 * 1000:06d}") if subdirs else outdir
    return os.path.join(image_dir, f"{seed:06d}.png")


def save_image(image: np.ndarray, path: str) -> None:
    """Write an HWC uint8 image as PNG, atomically (temporary name, then rename)."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
    try:
        with dnnlib.util.atomic_path(path) as tmp:
            PIL.Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).save(tmp, format="PNG")
    except OSError as err:
        raise OSError(f'Cannot write "{path}": {err.strerror or dnnlib.util.one_line(err)}') from err


def _load_networks(
    net: Any,
    gnet: Any,
    encoder: Any,
    device: torch.device,
    trust_embedded_code: bool,
    verbose: bool,
    distributed: bool = True,
) -> tuple:
    """The networks and the encoder, loaded where given as paths or URLs (the encoder defaults to the
    one stored with ``net``). Rank 0 goes first, so that downloads happen once; if it fails it still
    releases the others, which then fail the same way instead of hanging. ``distributed=False``: this
    process alone, without waiting for the others."""
    rank = dist.get_rank() if distributed else 0

    def load(source: str, what: str) -> dict:
        if verbose and rank == 0:
            print(f"Loading {what} from {source} ...")
        return load_network_pickle(source, trust_embedded_code=trust_embedded_code, verbose=(verbose and rank == 0))

    if rank != 0:
        dist.barrier()  # rank 0 loads first
    try:
        if isinstance(net, str):
            data = load(net, "network")
            net = data["ema"]
            encoder = data.get("encoder", None) if encoder is None else encoder
        if isinstance(gnet, str):
            gnet = load(gnet, "guiding network")["ema"]
        if net is None:
            raise ValueError("generate_images() needs a network")
        encoder = _check_encoder(net, encoder)
        if hasattr(encoder, "init"):
            try:
                encoder.init(device)  # e.g. fetch the VAE
            except Exception as err:
                raise OSError(
                    f"Cannot set up the encoder {type(encoder).__name__}: {dnnlib.util.one_line(err)}"
                ) from err
    finally:
        if rank == 0 and distributed:
            dist.barrier()
    return net, gnet, encoder


def _check_encoder(net: Any, encoder: Any) -> Any:
    """The encoder that turns ``net``'s samples into images: pixel networks default to
    StandardRGBEncoder; a latent network (not 1 or 3 channels) needs its own encoder."""
    from training.encoders import StandardRGBEncoder

    channels = getattr(net, "img_channels", 3)
    if (encoder is None or isinstance(encoder, StandardRGBEncoder)) and channels not in (1, 3):
        raise ValueError(
            f"The network generates {channels}-channel latents: it needs the encoder that decodes them "
            f"(e.g. training.encoders.StabilityVAEEncoder), not {type(encoder).__name__ if encoder else 'none'}"
        )
    return StandardRGBEncoder() if encoder is None else encoder


def _device_of(net: Any) -> torch.device:
    tensors = [*net.parameters(), *net.buffers()] if isinstance(net, torch.nn.Module) else []
    return tensors[0].device if tensors else torch.device("cpu")


@contextlib.contextmanager
def _sampling_mode(net: Any, device: torch.device, use_fp16: Optional[bool] = None) -> Iterator[Any]:
    """Use a network for sampling: on ``device``, in eval mode (MPConv rewrites its weights in
    training mode), without gradients and with ``use_fp16`` set (None = the network's own). The
    caller's module is restored afterwards: its device, training flags, requires_grad and use_fp16.
    No dtype change: float16 networks run as stored."""
    if not isinstance(net, torch.nn.Module):
        yield net
        return
    old_device = _device_of(net)
    training = [(m, m.training) for m in net.modules()]
    requires_grad = [(p, p.requires_grad) for p in net.parameters()]
    own_fp16 = getattr(net, "use_fp16", None)
    try:
        if use_fp16 is not None and own_fp16 is not None:
            net.use_fp16 = use_fp16
        yield net.eval().requires_grad_(False).to(device)
    finally:
        if own_fp16 is not None:
            net.use_fp16 = own_fp16
        net.to(old_device)
        for m, flag in training:
            m.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def generate_images(
    net: Union[str, torch.nn.Module],
    gnet: Union[str, torch.nn.Module, None] = None,
    encoder: Optional[Any] = None,
    outdir: Optional[str] = None,
    subdirs: bool = False,
    seeds: Sequence[int] = range(16, 24),
    class_idx: Union[int, Sequence[int], None] = None,
    max_batch_size: int = 32,
    encoder_batch_size: Optional[int] = 4,
    verbose: bool = True,
    device: Union[str, torch.device, None] = None,
    sampler_fn: Union[str, Callable] = edm_sampler,
    trust_embedded_code: bool = False,
    compile: bool = False,
    precision: Optional[str] = None,
    tf32: bool = False,
    distributed: bool = True,
    **sampler_kwargs: Any,
) -> Iterable[dnnlib.EasyDict]:
    """Generate one image per seed, split over the processes of a distributed run.

    ``net``/``gnet`` are modules or paths/URLs of network pickles; ``gnet=None`` guides with the
    main network itself (so guidance changes nothing). The encoder defaults to the one stored with
    ``net`` (else ``StandardRGBEncoder``, for pixel networks only). Returns an iterable (with
    ``len``, the number of batches of this process) that samples lazily and yields per batch an
    EasyDict with ``images`` (uint8 NCHW), ``labels``, ``noise``, ``batch_idx``, ``num_batches``,
    ``indices`` (into ``seeds``) and ``seeds``; with ``outdir`` the images are also written as PNG
    files. Networks passed as modules are left as they were (device, mode, requires_grad).
    ``compile`` runs the networks through ``torch.compile`` (see ``CompiledNetwork``): faster per
    step, after a one-time compile. ``precision`` (fp32, fp16 or bf16 autocast; None = each network's
    own use_fp16) and ``tf32`` (allowed while sampling) need CUDA except for fp32. ``class_idx`` is one
    class for every image or a list of one class per seed. ``distributed=False`` generates every seed in
    this process, without waiting for the others (e.g. rank 0 alone drawing a sample grid).
    """
    device = torch.device(device) if device is not None else misc.default_device()
    explicit = precision is not None
    precision = misc.resolve_precision(precision, None, device, tf32, cpu_bf16=True)  # refused before loading
    use_fp16 = precision.use_fp16 if explicit else None  # None: each network's own
    net, gnet, encoder = _load_networks(net, gnet, encoder, device, trust_embedded_code, verbose, distributed)
    if encoder_batch_size is not None and hasattr(encoder, "batch_size"):
        encoder.batch_size = encoder_batch_size
    seeds = list(seeds)
    classes = _class_list(class_idx, len(seeds), net.label_dim)
    sampler = dnnlib.util.get_obj_by_name(sampler_fn) if isinstance(sampler_fn, str) else sampler_fn
    rank, world_size = (None, None) if distributed else (0, 1)  # None: this process's share of the seeds
    batches = dist.rank_batches(len(seeds), max_batch_size, rank, world_size)
    print0 = dist.print0 if distributed else print
    if verbose:
        print0(f"Generating {len(seeds)} images...")

    def run_batch(net: Any, gnet: Any, batch_idx: int, indices: np.ndarray) -> dnnlib.EasyDict:
        r = dnnlib.EasyDict(
            images=None,
            labels=None,
            noise=None,
            batch_idx=batch_idx,
            num_batches=len(batches),
            indices=indices,
            seeds=[seeds[idx] for idx in indices],
        )
        if len(r.seeds) == 0:
            return r

        # Per-image randomness, in this order: noise, class (conditional nets), churn noise.
        rnd = StackedRandomGenerator(device, r.seeds)
        r.noise = rnd.randn([len(r.seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        if net.label_dim > 0:
            # Drawn even with class_idx, so that the churn noise does not depend on it.
            drawn = rnd.randint(net.label_dim, size=[len(r.seeds)], device=device)
            r.labels = torch.eye(net.label_dim, device=device)[
                drawn if classes is None else torch.as_tensor(classes[indices], device=device)
            ]

        # No autograd: it would only waste memory. Autocast and TF32 for the sampler only.
        with torch.no_grad(), precision.scope():
            latents = sampler(
                net=net, noise=r.noise, labels=r.labels, gnet=gnet, randn_like=rnd.randn_like, **sampler_kwargs
            )
        with torch.no_grad():
            r.images = encoder.decode(latents)
        if outdir is not None:
            for seed, image in zip(r.seeds, r.images.permute(0, 2, 3, 1).cpu().numpy()):
                save_image(image, image_path(outdir, seed, subdirs))
        return r

    def run() -> Iterator[dnnlib.EasyDict]:
        with _sampling_mode(net, device, use_fp16) as main, _sampling_mode(gnet, device, use_fp16) as guide:
            if compile:  # freezing: inductor may fold and prepack the weights, which stay fixed while sampling
                main = CompiledNetwork(main, options=dict(freezing=True))
                guide = CompiledNetwork(guide, options=dict(freezing=True)) if guide is not None else None
            for batch_idx, indices in enumerate(batches):
                r = run_batch(main, main if guide is None else guide, batch_idx, indices)
                if distributed:
                    dist.barrier()  # keep the processes in step
                yield r

    return dnnlib.util.SizedIterable(run, len(batches))


def _class_list(class_idx: Union[int, Sequence[int], None], num_seeds: int, label_dim: int) -> Optional[np.ndarray]:
    """The class of each seed (None: drawn per seed), checked against the network's classes."""
    if class_idx is None:
        return None
    classes = np.full([num_seeds], class_idx) if np.ndim(class_idx) == 0 else np.asarray(class_idx, dtype=np.int64)
    if classes.shape != (num_seeds,):
        raise ValueError(f"class_idx lists {classes.size} classes for {num_seeds} seeds")
    for c in classes:
        if not 0 <= c < label_dim:
            what = "the network is unconditional" if label_dim == 0 else f"the network has {label_dim} classes"
            raise ValueError(f"Class index {c} is out of range: {what}")
    return classes


# ----------------------------------------------------------------------------
# Seed lists.


def parse_int_list(s: Union[str, Sequence[int]]) -> list[int]:
    """Parse ``'1,2,5-10'`` into ``[1, 2, 5, 6, 7, 8, 9, 10]`` (order and duplicates kept).
    Raises ValueError with a one-line message for anything else."""
    if not isinstance(s, str):
        return [int(x) for x in s]
    result = []
    for part in s.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f'"{part}" is an empty range (expected a-b with a <= b)')
            result.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            result.append(int(part))
        else:
            raise ValueError(f'"{part}" is neither an integer nor a range a-b in "{s}"')
    return result
