"""Evaluation metrics: FID and FD_DINOv2, the library under ``calculate_metrics.py``.

Both metrics are Fréchet distances between Gaussians fitted to detector features,

    FD = |mu1 - mu2|^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^(1/2)),

with Inception-v3 pool features (2048-d) for FID and DINOv2 ViT-L/14 features (1024-d) for
FD_DINOv2. Feature statistics are accumulated in float64 as sum(f) and sum(f f^T) across all
processes, and stored as a pickle ``dict(num_images=N, fid=dict(mu, sigma), fd_dinov2=...)``
that is interchangeable with the reference implementation's ``dataset-refs`` files.

Detector weights are downloaded once into the dnnlib cache; offline, ``EDM2_INCEPTION_PKL`` and
``EDM2_DINOV2_REPO`` name local copies (see the detector classes). Any ``torch.nn.Module`` can stand
in for a detector through ``register_detector`` or the ``detectors`` argument.
"""

import json
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import PIL.Image
import scipy.linalg
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, persistence

# ----------------------------------------------------------------------------
# Fréchet distance.


def _factor_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """G^T sigma2 G for a factor G G^T = sigma1 of the symmetric positive semi-definite sigma1.

    G is the Cholesky factor when sigma1 is numerically positive definite, and the triangular
    products then run as BLAS trmm (half the work of general products). Covariances of fewer
    samples than dimensions are singular: then a pivoted Cholesky keeps the numerically nonzero
    pivots only (sigma1 = P L L^T P^T with L of d x rank), which drops nothing but rounding noise.
    """
    try:
        lower = np.asfortranarray(scipy.linalg.cholesky(sigma1, lower=True, check_finite=False))
    except np.linalg.LinAlgError:
        c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
        if info < 0:
            raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})") from None
        g = np.tril(c)[:, :rank]
        p = piv - 1
        return g.T @ sigma2[np.ix_(p, p)] @ g
    trmm = scipy.linalg.blas.dtrmm
    sigma2_l = trmm(1.0, lower, np.asfortranarray(sigma2), side=1, lower=1)  # sigma2 @ L
    return trmm(1.0, lower, sigma2_l, side=0, lower=1, trans_a=1, overwrite_b=1)  # L^T @ (sigma2 @ L)


def calculate_fd(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    The reference takes the trace of ``scipy.linalg.sqrtm(sigma1 @ sigma2)``. The eigenvalues of
    sigma1 sigma2 equal those of the symmetric PSD matrix G^T sigma2 G for any G G^T = sigma1, so

        tr (sigma1 sigma2)^(1/2) = sum_i sqrt(lambda_i(G^T sigma2 G)),

    which a Cholesky factor, two triangular products and a symmetric eigenvalue solve give with far
    less work than a general matrix square root (docs/performance.md). Eigenvalues that rounding pushes
    below zero count as zero, as they do in the real part of the reference's result.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Incompatible shapes: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("Feature statistics contain NaN or Inf")

    m = _factor_product(sigma1, sigma2)
    # Eigenvalues only (from the lower triangle); torch's LAPACK (MKL) does this about twice as
    # fast as numpy's OpenBLAS build.
    lam = torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(m))).numpy()
    tr_sqrt = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------
# Detectors: NCHW uint8 RGB images in, [N, feature_dim] float features out.

INCEPTION_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
)
DINOV2_REPO = "facebookresearch/dinov2:main"
DINOV2_MODEL = "dinov2_vitl14"
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)


class DetectorUnavailableError(OSError):
    """A detector could not be loaded; the message says what to download and where to put it."""


class Detector:
    """Base class: ``detector(x)`` maps NCHW uint8 RGB images to ``[N, feature_dim]`` features."""

    feature_dim: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModuleDetector(Detector):
    """Any ``torch.nn.Module`` as a detector: it receives the uint8 NCHW batch on the compute device
    and returns ``[N, feature_dim]`` features. ``feature_dim`` defaults to ``module.feature_dim``."""

    def __init__(self, module: torch.nn.Module, feature_dim: Optional[int] = None):
        feature_dim = feature_dim if feature_dim is not None else getattr(module, "feature_dim", None)
        if feature_dim is None:
            raise ValueError("ModuleDetector needs feature_dim (or a module with a feature_dim attribute)")
        self.module = module.eval().requires_grad_(False)
        self.feature_dim = int(feature_dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.to(x.device)(x)


class InceptionV3Detector(Detector):
    """FID's detector: the 2015-12-05 TensorFlow Inception-v3 ported to PyTorch (2048-d pool features).

    The published file is a pickle that carries its own source code, so loading it runs that code.
    It is loaded with ``trust_embedded_code=True`` because it is NVIDIA's published detector at the
    fixed ``INCEPTION_URL``; a local copy named by ``source`` or ``$EDM2_INCEPTION_PKL`` is trusted the
    same way, so point those only at a copy of that file. Downloads land in the dnnlib cache
    (``<cache>/downloads``) and are reused.
    """

    def __init__(self, source: Optional[str] = None, verbose: bool = True):
        self.feature_dim = 2048
        self.source = source or os.environ.get("EDM2_INCEPTION_PKL") or INCEPTION_URL
        try:
            with dnnlib.util.open_url(self.source, verbose=verbose) as f:
                self.model = persistence.load_pickle(f, trust_embedded_code=True)
        except Exception as e:
            cached = os.path.join(
                dnnlib.make_cache_dir_path("downloads"),
                dnnlib.util.cache_file_name(INCEPTION_URL).split("_", 1)[0] + "_inception-2015-12-05.pkl",
            )
            raise DetectorUnavailableError(
                f'Cannot load the Inception-v3 detector for fid from "{self.source}" ({dnnlib.util.one_line(e)}). '
                f"Download {INCEPTION_URL} and set EDM2_INCEPTION_PKL to its path, or save it as {cached}"
            ) from e

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.to(x.device)(x, return_features=True)


def dinov2_preprocess(x: torch.Tensor, resize_mode: str = "torch") -> torch.Tensor:
    """DINOv2 input: resize NCHW uint8 RGB to 224x224, scale to [0, 1], normalise with ImageNet's
    mean and std. ``resize_mode='torch'`` (the reference default) resizes in float32 with torch's
    antialiased bicubic, without clamping or rounding; ``'pil'`` resizes the uint8 images with
    Pillow's bicubic, as the dgm-eval code base does (slower, on the CPU)."""
    if resize_mode == "pil":
        images = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images = np.stack(
            [
                np.asarray(PIL.Image.fromarray(image).resize((224, 224), PIL.Image.Resampling.BICUBIC))
                for image in images
            ]
        )
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(x.device)
    elif resize_mode == "torch":
        x = torch.nn.functional.interpolate(x.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    else:
        raise ValueError(f'Invalid resize mode "{resize_mode}" (expected "torch" or "pil")')
    x = x.to(torch.float32) / 255
    mean = torch.tensor(DINOV2_MEAN, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(DINOV2_STD, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


class DINOv2Detector(Detector):
    """FD_DINOv2's detector: DINOv2 ViT-L/14 through ``torch.hub`` (1024-d features).

    The hub directory is ``<dnnlib cache>/torch_hub``: the code goes to
    ``facebookresearch_dinov2_main/`` and the weights to ``checkpoints/dinov2_vitl14_pretrain.pth``,
    and both are reused from there without a network connection. Alternatively ``repo`` or
    ``$EDM2_DINOV2_REPO`` names a local copy of the repository (loaded with ``source='local'``; the
    weights still come from the hub directory). Loading runs the repository's code, which is
    trusted because it is the known ``facebookresearch/dinov2`` repository or a copy of it.
    """

    def __init__(self, resize_mode: str = "torch", repo: Optional[str] = None, verbose: bool = True):
        if resize_mode not in ("torch", "pil"):
            raise ValueError(f'Invalid resize mode "{resize_mode}" (expected "torch" or "pil")')
        self.feature_dim = 1024
        self.resize_mode = resize_mode
        repo = repo or os.environ.get("EDM2_DINOV2_REPO")
        hub_dir = dnnlib.make_cache_dir_path("torch_hub")
        old_hub_dir = torch.hub.get_dir()
        torch.hub.set_dir(hub_dir)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "xFormers is not available")
                if repo:
                    model = torch.hub.load(repo, DINOV2_MODEL, source="local", verbose=False)
                else:
                    model = torch.hub.load(
                        DINOV2_REPO, DINOV2_MODEL, trust_repo=True, verbose=False, skip_validation=True
                    )
        except Exception as e:
            where = f'the local repository "{repo}"' if repo else f"torch.hub ({DINOV2_REPO})"
            raise DetectorUnavailableError(
                f"Cannot load the DINOv2 detector for fd_dinov2 from {where} ({dnnlib.util.one_line(e)}). "
                f"Put a copy of https://github.com/facebookresearch/dinov2 (branch main) in "
                f"{os.path.join(hub_dir, 'facebookresearch_dinov2_main')} (or set EDM2_DINOV2_REPO to it) and "
                f"{DINOV2_WEIGHTS_URL} in {os.path.join(hub_dir, 'checkpoints')}"
            ) from e
        finally:
            torch.hub.set_dir(old_hub_dir)
        self.model = model.eval().requires_grad_(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = dinov2_preprocess(x, self.resize_mode)
        return self.model.to(x.device)(x)


# Metric name -> detector factory. register_detector() adds or overrides entries of the cache.
metric_specs: dict[str, Callable[..., Detector]] = {
    "fid": InceptionV3Detector,
    "fd_dinov2": DINOv2Detector,
}

_detector_cache: dict[str, Detector] = {}


def _as_detector(detector: Union[Detector, torch.nn.Module]) -> Detector:
    if isinstance(detector, Detector):
        return detector
    if isinstance(detector, torch.nn.Module):
        return ModuleDetector(detector)
    raise TypeError(f"Expected a Detector or a torch.nn.Module, got {type(detector).__name__}")


def register_detector(metric: str, detector: Union[Detector, torch.nn.Module, None]) -> None:
    """Use ``detector`` for ``metric`` from now on (a new metric name is allowed; None forgets it).

    A ``torch.nn.Module`` is wrapped in ``ModuleDetector`` (it needs a ``feature_dim`` attribute).
    This is how tests, and users with their own feature extractors, bypass the downloads.
    """
    if detector is None:
        _detector_cache.pop(metric, None)
    else:
        _detector_cache[metric] = _as_detector(detector)


def known_metrics() -> list[str]:
    """The metric names ``get_detector`` can serve: the built-in ones and any registered."""
    return list(metric_specs) + [m for m in _detector_cache if m not in metric_specs]


def get_detector(metric: str, verbose: bool = True) -> Detector:
    """The detector of a metric, constructed once per process (rank 0 first, so downloads happen once)."""
    if metric in _detector_cache:
        return _detector_cache[metric]
    if metric not in metric_specs:
        raise ValueError(f'Unknown metric "{metric}" (choose from {", ".join(known_metrics())})')
    rank = dist.get_rank()
    if rank != 0:
        dist.barrier()
    try:
        if verbose:
            dist.print0(f"Setting up {metric_specs[metric].__name__}...")
        detector = metric_specs[metric](verbose=(verbose and rank == 0))
    finally:
        if rank == 0:
            dist.barrier()  # released even if rank 0 failed: the others then fail the same way
    _detector_cache[metric] = detector
    return detector


# ----------------------------------------------------------------------------
# Statistics files.


def _check_stats(stats: Any, path: str) -> dict:
    """Raise a one-line ValueError unless ``stats`` looks like a statistics dict."""

    def fail(why: str):
        raise ValueError(f'"{path}" is not a feature statistics file: {why}')

    if not isinstance(stats, dict):
        fail(f"expected a dict, found {type(stats).__name__}")
    metrics = [key for key in stats if key != "num_images"]
    if not metrics:
        fail("it holds no metrics")
    for metric in metrics:
        entry = stats[metric]
        if not isinstance(entry, dict) or "mu" not in entry or "sigma" not in entry:
            fail(f'entry "{metric}" has no mu and sigma')
        mu, sigma = np.asarray(entry["mu"]), np.asarray(entry["sigma"])
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            fail(f'entry "{metric}" has mu of shape {list(mu.shape)} and sigma of shape {list(sigma.shape)}')
    return stats


def load_stats(path: str, verbose: bool = True) -> dict:
    """Read feature statistics from a path or URL (URLs go through the dnnlib download cache).

    ``.pkl``: the dict written by ``save_stats``, read as plain data (no code runs). ``.npz``
    (older EDM code, recognised by the suffix in any case): its ``mu`` and ``sigma`` stand for
    ``fid``, i.e. ``{'fid': arrays}``. A file that cannot be opened raises OSError, anything
    else that is no statistics file ValueError, both with a one-line message.
    """
    if verbose:
        print(f"Loading feature statistics from {path} ...")
    try:
        f = dnnlib.util.open_url(path, verbose=verbose)
    except Exception as e:
        raise OSError(f'Cannot open feature statistics "{path}": {dnnlib.util.one_line(e)}') from e
    with f:
        try:
            if path.lower().endswith(".npz"):  # backwards compatibility with NVlabs/edm
                with np.load(f, allow_pickle=False) as npz:
                    stats = {"fid": {key: npz[key] for key in npz.files}}
            else:
                stats = persistence.load_data_pickle(f, what=f'"{path}"')
        except Exception as e:
            raise ValueError(f'"{path}" is not a feature statistics file: {dnnlib.util.one_line(e)}') from e
    return _check_stats(stats, path)


def save_stats(stats: Mapping[str, Any], path: str, verbose: bool = True) -> None:
    """Write feature statistics as a pickle (a temporary file renamed into place when complete)."""
    if verbose:
        print(f"Saving feature statistics to {path} ...")
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(dict(stats), f)


# ----------------------------------------------------------------------------
# Feature statistics.


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy; the identity for a single process)."""
    x = x.clone()
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(x)
    return x


def _unpack_images(batch: Any) -> Optional[torch.Tensor]:
    """Images from whatever an iterable yields: a tensor/array, (images, labels), or a dict with 'images'."""
    if isinstance(batch, dict):
        batch = batch.get("images")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch = batch[0]
    if batch is None:
        return None
    images = torch.as_tensor(batch)
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"Detectors need NCHW uint8 images, got {images.dtype} of shape {list(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])  # grayscale -> RGB
    if images.shape[1] != 3:
        raise ValueError(f"Detectors need RGB images, got {images.shape[1]} channels")
    return images


def calculate_stats_for_iterable(
    image_iter: Iterable[Any],  # Batches: NCHW uint8 images, (images, labels) or dicts with 'images'.
    metrics: Sequence[str] = ("fid", "fd_dinov2"),  # Metrics to compute the statistics for.
    verbose: bool = True,  # Print status messages?
    dest_path: Optional[str] = None,  # Where to save the statistics (rank 0). None = do not save.
    device: Union[str, torch.device, None] = None,  # Compute device. None = cuda if available, else cpu.
    detectors: Optional[Mapping[str, Union[Detector, torch.nn.Module]]] = None,  # Override detectors per metric.
) -> Iterable[dnnlib.EasyDict]:
    """Accumulate detector feature statistics over the batches of ``image_iter``.

    Returns an iterable (with ``len``) that yields per batch an EasyDict with ``images``,
    ``batch_idx``, ``num_batches``, ``num_images`` (so far, over all processes) and ``stats``:
    None except after the last batch, where it is ``dict(num_images=N, <metric>=dict(mu, sigma))``
    with mu = sum(f)/N and sigma = (sum(f f^T) - N mu mu^T)/(N - 1) in float64. Every process
    must run the same number of batches (a batch may be None or empty).
    """
    device = torch.device(device) if device is not None else misc.default_device()
    metrics = list(metrics)
    num_batches = len(image_iter)
    dets = [
        _as_detector(detectors[m]) if detectors and m in detectors else get_detector(m, verbose=verbose)
        for m in metrics
    ]
    if verbose:
        dist.print0("Calculating feature statistics...")

    def run() -> Iterator[dnnlib.EasyDict]:
        cum_f = [torch.zeros([d.feature_dim], dtype=torch.float64, device=device) for d in dets]
        cum_ff = [torch.zeros([d.feature_dim, d.feature_dim], dtype=torch.float64, device=device) for d in dets]
        cum_images = torch.zeros([], dtype=torch.int64, device=device)
        for batch_idx, batch in enumerate(image_iter):
            images = _unpack_images(batch)
            if images is not None and images.shape[0] > 0:
                images = images.to(device)
                with torch.no_grad():
                    for det, f_sum, ff_sum in zip(dets, cum_f, cum_ff):
                        features = det(images).to(torch.float64).reshape(images.shape[0], -1)
                        if features.shape[1] != det.feature_dim:
                            raise ValueError(
                                f"Detector returned {features.shape[1]} features, expected {det.feature_dim}"
                            )
                        f_sum += features.sum(0)
                        ff_sum += features.T @ features
                cum_images += images.shape[0]
            r = dnnlib.EasyDict(
                stats=None,
                images=images,
                batch_idx=batch_idx,
                num_batches=num_batches,
                num_images=int(_all_reduce(cum_images).cpu()),
            )
            if batch_idx == num_batches - 1:
                r.stats = _finish_stats(metrics, cum_f, cum_ff, r.num_images)
                if dest_path is not None and dist.get_rank() == 0:
                    save_stats(r.stats, dest_path, verbose=verbose)
            yield r

    return dnnlib.util.SizedIterable(run, num_batches)


def _finish_stats(
    metrics: Sequence[str], cum_f: Sequence[torch.Tensor], cum_ff: Sequence[torch.Tensor], n: int
) -> dict:
    """mu and sigma per metric from the feature sums of every process."""
    if n < 2:
        raise ValueError(f"Need at least 2 images to compute feature statistics, got {n}")
    stats = dict(num_images=n)
    for metric, f_sum, ff_sum in zip(metrics, cum_f, cum_ff):
        mu = _all_reduce(f_sum) / n
        sigma = (_all_reduce(ff_sum) - n * torch.outer(mu, mu)) / (n - 1)
        stats[metric] = dict(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy())
    return stats


def _image_file_batches(
    image_path: str,
    num_images: Optional[int] = None,
    seed: int = 0,
    max_batch_size: int = 64,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    verbose: bool = True,
    repeat: int = 0,
    repeats: int = 1,
) -> Iterable[Any]:
    """This process's batches of the images in a folder or ZIP (None for an empty batch): the
    seeded subset rule of ``ImageFolderDataset``'s ``max_size``, split across processes as in
    sampling (``torch_utils.distributed.rank_batches``). With ``repeats`` > 1, the subset of
    ``repeat`` among ``repeats`` disjoint ones (``disjoint_subsets``; subset 0 is the one above)."""
    from training.dataset import ImageFolderDataset

    if verbose:
        dist.print0(f"Loading images from {image_path} ...")
    max_size = num_images if repeats == 1 else None  # several subsets: all images, then one subset of them
    try:
        dataset = ImageFolderDataset(path=image_path, max_size=max_size, random_seed=seed, use_labels=False)
    except Exception as e:
        raise OSError(f'Cannot read images from "{image_path}": {dnnlib.util.one_line(e)}') from e
    if num_images is not None and len(dataset) < num_images * repeats:
        needed = (
            f"{num_images}" if repeats == 1 else f"{num_images * repeats} ({repeats} disjoint sets of {num_images})"
        )
        raise ValueError(f'Found {len(dataset)} images in "{image_path}", but expected at least {needed}')
    if repeats > 1:
        subset = disjoint_subsets(len(dataset), num_images, repeats, seed)[repeat]
        dataset = torch.utils.data.Subset(dataset, subset.tolist())
    if len(dataset) < 2:
        raise ValueError(f'Found {len(dataset)} images in "{image_path}", but need at least 2')
    rank_batches = dist.rank_batches(len(dataset), max_batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[b for b in rank_batches if len(b) > 0],
        num_workers=num_workers,
        prefetch_factor=(prefetch_factor if num_workers > 0 else None),
    )

    def run() -> Iterator[Any]:
        loader_iter = iter(loader)
        for batch in rank_batches:
            yield next(loader_iter) if len(batch) > 0 else None

    return dnnlib.util.SizedIterable(run, len(rank_batches))


def calculate_stats_for_files(
    image_path: str,  # A folder or ZIP of images (dataset_tool.py layout or any image files).
    num_images: Optional[int] = None,  # Use a random subset of this many images (fewer is an error). None = all.
    seed: int = 0,  # Seed of the random subset.
    max_batch_size: int = 64,  # Images per batch and process.
    num_workers: int = 2,  # Data-loader worker processes.
    prefetch_factor: int = 2,  # Batches loaded ahead by each worker.
    verbose: bool = True,  # Print status messages?
    **stats_kwargs: Any,  # Passed on to calculate_stats_for_iterable().
) -> Iterable[dnnlib.EasyDict]:
    """``calculate_stats_for_iterable`` over the image files of a folder or ZIP."""
    batches = _image_file_batches(image_path, num_images, seed, max_batch_size, num_workers, prefetch_factor, verbose)
    return calculate_stats_for_iterable(batches, verbose=verbose, **stats_kwargs)


def calculate_metrics_from_stats(
    stats: Mapping[str, Any],  # Statistics of the generated images.
    ref: Union[str, Mapping[str, Any]],  # Reference statistics, or their path or URL.
    metrics: Sequence[str] = ("fid", "fd_dinov2"),  # Metrics to compute.
    verbose: bool = True,  # Print the results?
) -> dict[str, float]:
    """Fréchet distance per metric; metrics missing from either side are skipped with a message."""
    if isinstance(ref, str):
        ref = load_stats(ref, verbose=verbose)
    results = {}
    for metric in metrics:
        if metric not in stats or metric not in ref:
            if verbose:
                print(f"No statistics computed for {metric} -- skipping.")
            continue
        if verbose:
            print(f"Calculating {metric}...")
        a, b = stats[metric], ref[metric]
        if np.shape(a["mu"]) != np.shape(b["mu"]):
            raise ValueError(
                f"{metric}: the statistics have {np.shape(a['mu'])[0]} features, the reference {np.shape(b['mu'])[0]}"
            )
        results[metric] = calculate_fd(a["mu"], a["sigma"], b["mu"], b["sigma"])
        if verbose:
            print(f"{metric} = {results[metric]:g}")
    return results


# ----------------------------------------------------------------------------
# Repeated evaluations: disjoint seed sets or image subsets, and the summary over them.


def repeat_seeds(seed: int, num: int, repeats: int) -> list[range]:
    """Seed sets of ``repeats`` evaluations of ``num`` images: repeat k uses seed + k*num .. seed + (k+1)*num - 1,
    so that no image is shared (e.g. 0-49999, 50000-99999, 100000-149999)."""
    if num < 1 or repeats < 1:
        raise ValueError(f"Need at least one image and one repeat, got num={num}, repeats={repeats}")
    return [range(seed + k * num, seed + (k + 1) * num) for k in range(repeats)]


def disjoint_subsets(num_total: int, num: int, repeats: int, seed: int = 0) -> list[np.ndarray]:
    """``repeats`` disjoint random subsets of ``num`` of the indices 0 .. num_total-1, each in increasing order.

    One seeded shuffle of all indices (legacy ``RandomState(seed)``, the subset rule of ``ImageFolderDataset``'s
    ``max_size``) cut into consecutive runs of ``num``: subset 0 is the single subset that rule picks.
    """
    if num * repeats > num_total:
        raise ValueError(f"{repeats} disjoint subsets of {num} need {num * repeats} items, but there are {num_total}")
    order = np.arange(num_total, dtype=np.int64)
    np.random.RandomState(seed % (1 << 31)).shuffle(order)
    return [np.sort(order[k * num : (k + 1) * num]) for k in range(repeats)]


def summarize_repeats(results: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric over the repeats: ``values`` (in order), ``min``, ``mean`` and ``std``, the sample standard
    deviation sqrt(sum (x_k - mean)^2 / (K - 1)) (None for a single repeat). Metrics missing from a repeat are
    summarised over the repeats that have them."""
    summary = {}
    names = [m for r in results for m in r]
    for metric in dict.fromkeys(names):
        values = [float(r[metric]) for r in results if metric in r]
        mean = sum(values) / len(values)
        std = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        summary[metric] = dict(values=values, min=min(values), mean=mean, std=std)
    return summary


def format_repeat_summary(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The summary of ``summarize_repeats`` as a small text table: one row per metric."""
    lines = [f"{'metric':<12}{'min':>12}{'mean':>12}{'std':>12}  values"]
    for metric, s in summary.items():
        std = "-" if s["std"] is None else f"{s['std']:.6g}"
        values = ", ".join(f"{v:.6g}" for v in s["values"])
        lines.append(f"{metric:<12}{s['min']:>12.6g}{s['mean']:>12.6g}{std:>12}  {values}")
    return "\n".join(lines)


def append_json_line(path: str, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single ``write`` on an O_APPEND descriptor, then fsync.

    A process killed mid-write leaves at most a partial last line, which readers skip; the next append
    then starts on a fresh line, so it is never glued to the fragment.
    """
    line = (json.dumps(record, sort_keys=False) + "\n").encode()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: str) -> list[dict]:
    """The records of a JSON-lines file (none if it does not exist); lines that do not parse, such as the
    fragment a killed writer left, are skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


# ----------------------------------------------------------------------------
# Metric lists.


def parse_metric_list(s: Union[str, Sequence[str]]) -> list[str]:
    """``'fid,fd_dinov2'`` -> ``['fid', 'fd_dinov2']``; unknown names raise ValueError."""
    metrics = [m.strip() for m in s.split(",")] if isinstance(s, str) else list(s)
    for metric in metrics:
        if metric not in known_metrics():
            raise ValueError(f'unknown metric "{metric}" (choose from {", ".join(known_metrics())})')
    if not metrics or len(set(metrics)) != len(metrics):
        raise ValueError(f'"{s}" must name each metric once')
    return metrics
