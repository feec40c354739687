"""Sampling from trained EDM2 networks: the time steps and the samplers, per-image random generators,
loading networks for sampling, and ``generate_images()``, the library function under ``generate_images.py``,
``calculate_metrics.py gen`` and the sample grids of a training run.

The samplers integrate the probability-flow ODE of Karras et al. (EDM, 2022) over one schedule of
noise levels: Heun's second-order method with optional "churn" noise (``edm_sampler``, the
paper's), Euler's method, and DPM-Solver++(2M). Guidance (classifier-free guidance or
autoguidance) extrapolates from a guiding network's denoised estimate towards the main network's,
at every step or only on the steps whose noise level lies in a guidance interval (Kynkaanniemi et
al. 2024). Every image draws its randomness from a generator seeded by its own seed, so a seed
gives the same noise, class and churn noise whatever the batch it lands in and however many
processes share the work.
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
# Samplers. Each integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma over the
# same schedule (edm_time_steps) and shares edm_sampler's signature, so that any of them can be
# passed to generate_images() as ``sampler_fn``.


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


def check_guidance_interval(guidance_interval: Optional[Sequence[float]]) -> Optional[tuple[float, float]]:
    """``(lo, hi)`` as two floats with 0 <= lo <= hi, or None (guidance at every step)."""
    if guidance_interval is None:
        return None
    try:
        lo, hi = (float(value) for value in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(f"The guidance interval must be two noise levels LO,HI, not {guidance_interval!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"The guidance interval needs 0 <= LO <= HI, not LO={lo:g}, HI={hi:g}")
    return lo, hi


def parse_guidance_interval(s: Union[str, Sequence[float], None]) -> Optional[tuple[float, float]]:
    """Parse ``'LO,HI'`` (or a pair) into ``(lo, hi)``; ValueError with a one-line message otherwise."""
    if isinstance(s, str):
        parts = [part.strip() for part in s.split(",")]
        try:
            s = [float(part) for part in parts] if len(parts) == 2 else None
        except ValueError:
            s = None
        if s is None:
            raise ValueError(f'"{", ".join(parts)}" is not two noise levels LO,HI (e.g. 0.28,1.61)')
    return check_guidance_interval(s)


class GuidedDenoiser:
    """D(x; sigma) for one sampler run: the main network, extrapolated from the guiding network's
    estimate (D = D_g + guidance * (D - D_g)) on the steps whose scheduled noise level t_i lies in
    ``guidance_interval`` (inclusive; None: every step). Outside it, and with ``guidance == 1`` or no
    guiding network other than ``net`` (D_g = D gives D), the guiding network is not evaluated.
    ``nfe`` counts the evaluations of each network."""

    def __init__(
        self,
        net: Callable,
        gnet: Optional[Callable],
        labels: Optional[torch.Tensor],
        guidance: float,
        guidance_interval: Optional[Sequence[float]],
        dtype: torch.dtype,
    ):
        self.net, self.gnet, self.labels, self.guidance, self.dtype = net, gnet, labels, guidance, dtype
        self.interval = check_guidance_interval(guidance_interval)
        self.guided = not (guidance == 1 or gnet is None or gnet is net)
        self.nfe = dict(net=0, gnet=0)

    def guides_at(self, t_step: torch.Tensor) -> bool:
        """Whether the step that starts at noise level ``t_step`` uses guidance."""
        return self.guided and (self.interval is None or self.interval[0] <= t_step <= self.interval[1])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_step: torch.Tensor) -> torch.Tensor:
        """D(x; t) within the step that starts at ``t_step``."""
        self.nfe["net"] += 1
        Dx = self.net(x, t, self.labels).to(self.dtype)
        if not self.guides_at(t_step):
            return Dx
        self.nfe["gnet"] += 1
        ref_Dx = self.gnet(x, t, self.labels).to(self.dtype)
        return ref_Dx.lerp(Dx, self.guidance)


def _refuse_churn(sampler: str, S_churn: float) -> None:
    if S_churn > 0:
        raise ValueError(f"The {sampler} sampler has no churn: S_churn must be 0, not {S_churn:g}")


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
    guidance_interval: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Solve the probability-flow ODE from x = noise * sigma_max down to sigma = 0 with Heun's
    method (EDM, Algorithm 2): 2N - 1 evaluations for N steps.

    ``net(x, sigma, labels)`` is the denoiser D(x; sigma); with ``guidance != 1`` the guiding
    network's estimate is extrapolated towards it (see ``GuidedDenoiser``), on the steps whose noise
    level lies in ``guidance_interval`` (None: every step). ``randn_like`` supplies the churn noise,
    which must come from each image's own generator for per-seed determinism.
    """
    denoise = GuidedDenoiser(net, gnet, labels, guidance, guidance_interval, dtype)
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
        d_cur = (x_hat - denoise(x_hat, t_hat, t_cur)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun's 2nd order correction (skipped on the last step, which ends at sigma = 0).
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next, t_cur)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def euler_sampler(
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
    guidance_interval: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (first order): x_{i+1} = x_i + (t_{i+1} - t_i) d_i
    with d_i = (x_i - D(x_i; t_i)) / t_i; N evaluations for N steps. No churn; otherwise as
    ``edm_sampler``."""
    _refuse_churn("euler", S_churn)
    denoise = GuidedDenoiser(net, gnet, labels, guidance, guidance_interval, dtype)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x = noise.to(dtype) * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        d_cur = (x - denoise(x, t_cur, t_cur)) / t_cur
        x = x + (t_next - t_cur) * d_cur
    return x


def dpmpp_2m_sampler(
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
    guidance_interval: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep method in data prediction; N
    evaluations for N steps. No churn; otherwise as ``edm_sampler``.

    In log-noise time lambda = -log sigma the ODE reads dx/dlambda = D(x; sigma) - x, whose exact
    solution over h = lambda_{i+1} - lambda_i is x_{i+1} = e^{-h} x_i + integral of e^{lambda -
    lambda_{i+1}} D dlambda. With D constant this is x_{i+1} = (t_{i+1}/t_i) x_i - (e^{-h} - 1) D_i
    (first order; the first step). Afterwards D is extrapolated linearly in lambda from the previous
    estimate, D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_{i-1} / h_i (second order). The last
    step, to sigma = 0 (h infinite), returns the denoised estimate.
    """
    _refuse_churn("dpmpp-2m", S_churn)
    denoise = GuidedDenoiser(net, gnet, labels, guidance, guidance_interval, dtype)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x = noise.to(dtype) * t_steps[0]
    D_prev, h_prev = None, None
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        D_cur = denoise(x, t_cur, t_cur)
        if t_next == 0:
            return D_cur
        h = (t_cur / t_next).log()  # lambda_{i+1} - lambda_i
        D_prime = D_cur
        if D_prev is not None:
            r = h_prev / h
            D_prime = (1 + 1 / (2 * r)) * D_cur - (1 / (2 * r)) * D_prev
        x = (t_next / t_cur) * x - torch.expm1(-h) * D_prime
        D_prev, h_prev = D_cur, h
    return x


# The samplers by name (--sampler); each has edm_sampler's signature.
SAMPLERS: dict[str, Callable] = {"heun": edm_sampler, "euler": euler_sampler, "dpmpp-2m": dpmpp_2m_sampler}


def get_sampler(sampler_fn: Union[str, Callable]) -> Callable:
    """A sampler function: itself, one of ``SAMPLERS`` by name, or a function by its dotted name."""
    if not isinstance(sampler_fn, str):
        return sampler_fn
    if sampler_fn in SAMPLERS:
        return SAMPLERS[sampler_fn]
    if "." not in sampler_fn:
        raise ValueError(f'Unknown sampler "{sampler_fn}": choose one of {", ".join(SAMPLERS)} or a dotted name')
    return dnnlib.util.get_obj_by_name(sampler_fn)


def count_evaluations(sampler_fn: Union[str, Callable], guided: bool = True, **sampler_kwargs: Any) -> dict[str, int]:
    """Network evaluations per image, ``dict(net=..., gnet=...)``, of a sampler run with these
    keyword arguments: the sampler runs once on a single number with networks that only count their
    calls, so the count follows from its schedule, its method and the guidance interval, whatever
    the sampler. ``guided=False``: there is no guiding network other than the main one."""
    sampler = get_sampler(sampler_fn)
    nfe = dict(net=0, gnet=0)

    def counting_net(name: str) -> Callable:
        def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
            nfe[name] += 1
            return torch.zeros_like(x)

        return denoise

    net = counting_net("net")
    gnet = counting_net("gnet") if guided else net
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if key not in ("dtype", "randn_like")}
    sampler(net=net, noise=torch.zeros([1, 1, 1, 1]), gnet=gnet, randn_like=torch.zeros_like, **sampler_kwargs)
    return nfe


def describe_nfe(sampler_fn: Union[str, Callable], nfe: dict[str, int]) -> str:
    """E.g. ``"dpmpp-2m: 32 network evaluations per image (+ 6 of the guiding network)"``."""
    sampler = get_sampler(sampler_fn)
    name = next((key for key, value in SAMPLERS.items() if value is sampler), getattr(sampler, "__name__", "sampler"))
    guide = f" (+ {nfe['gnet']} of the guiding network)" if nfe["gnet"] else ""
    return f"{name}: {nfe['net']} network evaluations per image{guide}"


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
    guidance_interval: Optional[Sequence[float]] = None,
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

    ``sampler_fn`` is a sampler function, a name in ``SAMPLERS`` (heun, euler, dpmpp-2m) or a dotted
    name; ``sampler_kwargs`` go to it (num_steps, guidance, ...). ``guidance_interval=(lo, hi)``
    guides only the steps whose noise level lies in [lo, hi]. The returned iterable's ``nfe``, and
    each batch's, is ``dict(net=..., gnet=...)``: the network evaluations per image (None for a
    sampler function not in ``SAMPLERS``).
    """
    device = torch.device(device) if device is not None else misc.default_device()
    explicit = precision is not None
    precision = misc.resolve_precision(precision, None, device, tf32, cpu_bf16=True)  # refused before loading
    use_fp16 = precision.use_fp16 if explicit else None  # None: each network's own
    sampler, nfe = _plan_sampler(sampler_fn, gnet is not None and gnet is not net, guidance_interval, sampler_kwargs)
    net, gnet, encoder = _load_networks(net, gnet, encoder, device, trust_embedded_code, verbose, distributed)
    if encoder_batch_size is not None and hasattr(encoder, "batch_size"):
        encoder.batch_size = encoder_batch_size
    seeds = list(seeds)
    classes = _class_list(class_idx, len(seeds), net.label_dim)
    rank, world_size = (None, None) if distributed else (0, 1)  # None: this process's share of the seeds
    batches = dist.rank_batches(len(seeds), max_batch_size, rank, world_size)
    print0 = dist.print0 if distributed else print
    if verbose:
        print0(f"Generating {len(seeds)} images{'' if nfe is None else ' with ' + describe_nfe(sampler, nfe)}...")

    def run_batch(net: Any, gnet: Any, batch_idx: int, indices: np.ndarray) -> dnnlib.EasyDict:
        r = dnnlib.EasyDict(images=None, labels=None, noise=None, batch_idx=batch_idx, num_batches=len(batches))
        r.update(indices=indices, seeds=[seeds[idx] for idx in indices], nfe=None if nfe is None else dict(nfe))
        if len(r.seeds) == 0:
            return r
        rnd, r.noise, r.labels = _seed_draws(net, r.seeds, None if classes is None else classes[indices], device)

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

    images = dnnlib.util.SizedIterable(run, len(batches))
    images.nfe = None if nfe is None else dict(nfe)
    return images


def _seed_draws(net: Any, seeds: list[int], classes: Optional[np.ndarray], device: torch.device) -> tuple:
    """Per-image randomness, in this order: noise, class (conditional nets; drawn even when ``classes``
    are given, so that the churn noise does not depend on them), then the generators for churn noise.
    Returns (generators, noise, one-hot labels or None)."""
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = None
    if net.label_dim > 0:
        drawn = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        labels = torch.eye(net.label_dim, device=device)[
            drawn if classes is None else torch.as_tensor(classes, device=device)
        ]
    return rnd, noise, labels


def _plan_sampler(
    sampler_fn: Union[str, Callable], guided: bool, guidance_interval: Optional[Sequence[float]], sampler_kwargs: dict
) -> tuple[Callable, Optional[dict[str, int]]]:
    """The sampler function and its evaluations per image (None for a function not in ``SAMPLERS``:
    it may expect real networks). Adds the checked interval to ``sampler_kwargs`` only when set, as
    samplers of the reference's signature lack it. Refuses options the sampler lacks (e.g. churn with
    euler) before anything is loaded."""
    sampler = get_sampler(sampler_fn)
    if guidance_interval is not None:
        sampler_kwargs["guidance_interval"] = check_guidance_interval(guidance_interval)
    nfe = count_evaluations(sampler, guided, **sampler_kwargs) if sampler in SAMPLERS.values() else None
    return sampler, nfe


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
