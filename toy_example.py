"""The 2D toy example of "Guiding a Diffusion Model with a Bad Version of Itself" (Karras et al.,
NeurIPS 2024, arXiv 2406.02507, Section 5 / Figure 2).

Two classes, A and B, each a tree that branches recursively in two from a common origin, the two
trees growing in opposite directions. Every branch is a row of elongated Gaussian components, so the
data density is a Gaussian mixture whose density, score and ideal denoiser are known in closed form,
also for its sigma-smoothed versions p_sigma = p * N(0, sigma^2 I) (add sigma^2 I to every covariance).

Small MLP denoisers with EDM preconditioning are trained on samples of the mixture (`train`), and
`plot` compares, against the true density, unguided sampling, classifier-free guidance (guiding model:
an unconditional model) and autoguidance (guiding model: a smaller, less-trained model of the same
class).

Unlike the reference implementation, everything runs on a CPU; CUDA is used when available.
"""

import copy
import io
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import click
import numpy as np
import torch
import tqdm
from PIL import Image, ImageDraw, ImageFont

CLASS_NAMES = "AB"  # class index i is CLASS_NAMES[i]

# ----------------------------------------------------------------------------
# Gaussian mixtures in closed form (pure functions of tensors).
#
# mu [K, 2], cov [K, 2, 2], weight [K] (summing to 1); x [N, 2]; sigma a float or a tensor that
# broadcasts to [N]. The sigma-smoothed mixture has covariances cov_k + sigma^2 I.


def _quadratic_coefficients(mu: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor,
                            sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """log w_k N(x; mu_k, S_k), S_k = cov_k + sigma^2 I, is a quadratic in x: with P = S^-1 it equals
    -x'Px/2 + (P mu)'x + const_k. Returns the coefficients of the features [x^2, xy, y^2, x, y, 1] as
    [B, 6, K] (B = 1 for one sigma, else one row per sigma) and the precision terms [Pxx, Pxy, Pyy,
    (P mu)_x, (P mu)_y] as [B, K, 5] that the score needs. 2x2 inverses are written out."""
    s2 = sigma.reshape(-1, 1) ** 2  # [B, 1]
    a, c = cov[:, 0, 0] + s2, cov[:, 1, 1] + s2  # [B, K]
    b = cov[:, 0, 1].expand_as(a)
    det = a * c - b * b
    pxx, pxy, pyy = c / det, -b / det, a / det
    pmx = pxx * mu[:, 0] + pxy * mu[:, 1]
    pmy = pxy * mu[:, 0] + pyy * mu[:, 1]
    const = torch.log(weight) - 0.5 * torch.log(det) - math.log(2 * math.pi) - 0.5 * (mu[:, 0] * pmx + mu[:, 1] * pmy)
    coef = torch.stack([-0.5 * pxx, -pxy, -0.5 * pyy, pmx, pmy, const], dim=1)
    return coef, torch.stack([pxx, pxy, pyy, pmx, pmy], dim=2)


def _features(x: torch.Tensor) -> torch.Tensor:
    u, v = x[:, 0], x[:, 1]
    return torch.stack([u * u, u * v, v * v, u, v, torch.ones_like(u)], dim=1)  # [N, 6]


def _log_terms(x: torch.Tensor, sigma: Union[float, torch.Tensor], mu: torch.Tensor, cov: torch.Tensor,
               weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """log w_k N(x; mu_k, cov_k + sigma^2 I) as [N, K] (one matrix product when sigma is shared), and the
    precision terms of _quadratic_coefficients. `sigma` is a scalar or has one entry per row of x."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    coef, prec = _quadratic_coefficients(mu, cov, weight, sigma)
    feats = _features(x)
    if len(sigma) == 1:
        return feats @ coef[0], prec
    return torch.einsum("nf,nfk->nk", feats, coef), prec


def gmm_logp(x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor,
             sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
    """log p_sigma(x) of the mixture, shape [N]."""
    return torch.logsumexp(_log_terms(x, sigma, mu, cov, weight)[0], dim=1)


def gmm_score(x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor,
              sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
    """grad_x log p_sigma(x) = sum_k r_k(x) P_k (mu_k - x), shape [N, 2], with r_k the posterior
    responsibilities of the components and P_k = (cov_k + sigma^2 I)^-1."""
    log_terms, prec = _log_terms(x, sigma, mu, cov, weight)
    r = torch.softmax(log_terms, dim=1)
    rp = r @ prec[0] if len(prec) == 1 else torch.einsum("nk,nkf->nf", r, prec)  # sum_k r_k [Pxx, Pxy, Pyy, Pmu]
    pxx, pxy, pyy, pmx, pmy = rp.unbind(1)
    u, v = x[:, 0], x[:, 1]
    return torch.stack([pmx - pxx * u - pxy * v, pmy - pxy * u - pyy * v], dim=1)


def gmm_denoiser(x: torch.Tensor, sigma: Union[float, torch.Tensor], mu: torch.Tensor, cov: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """The ideal denoiser D(x; sigma) = E[y | y + sigma n = x] = x + sigma^2 grad log p_sigma(x) (Tweedie)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
    return x + s ** 2 * gmm_score(x, mu, cov, weight, sigma)


@dataclass
class GaussianMixture:
    """A 2D Gaussian mixture whose components belong to classes (index into CLASS_NAMES)."""

    mu: torch.Tensor  # [K, 2]
    cov: torch.Tensor  # [K, 2, 2]
    weight: torch.Tensor  # [K], sums to 1
    label: torch.Tensor  # [K], int64 class index of each component

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "GaussianMixture":
        return GaussianMixture(self.mu.to(device, dtype), self.cov.to(device, dtype), self.weight.to(device, dtype),
                               self.label.to(device))

    def select(self, classes: str) -> "GaussianMixture":
        """The mixture restricted to the given classes (e.g. 'A' or 'AB'), renormalised."""
        keep = torch.zeros_like(self.label, dtype=torch.bool)
        for name in classes:
            keep |= self.label == CLASS_NAMES.index(name)
        weight = self.weight[keep]
        return GaussianMixture(self.mu[keep], self.cov[keep], weight / weight.sum(), self.label[keep])

    def widen(self, std: float) -> "GaussianMixture":
        """Every component blurred by N(0, std^2 I): the same as the std-smoothed density."""
        eye = torch.eye(2, dtype=self.cov.dtype, device=self.cov.device)
        return GaussianMixture(self.mu, self.cov + std ** 2 * eye, self.weight, self.label)

    def logp(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        return _chunked(lambda xc, sc: gmm_logp(xc, self.mu, self.cov, self.weight, sc), x, sigma)

    def score(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        return _chunked(lambda xc, sc: gmm_score(xc, self.mu, self.cov, self.weight, sc), x, sigma)

    def denoise(self, x: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        return _chunked(lambda xc, sc: gmm_denoiser(xc, sc, self.mu, self.cov, self.weight), x, sigma)

    def sample(self, num: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """`num` samples [num, 2] and their class indices [num]."""
        device = self.mu.device
        k = torch.multinomial(self.weight, num, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.cov)
        eps = torch.randn([num, 2, 1], dtype=self.mu.dtype, device=device, generator=generator)
        return self.mu[k] + (chol[k] @ eps).squeeze(-1), self.label[k]


def _chunked(fn: Callable, x: torch.Tensor, sigma: Union[float, torch.Tensor], chunk: int = 8192) -> torch.Tensor:
    """Evaluate fn(x, sigma) in chunks of rows to bound the [N, K] intermediates."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sigma.numel() == 1:  # one sigma for all: keep the covariance terms [1, K]
        return torch.cat([fn(x[i:i + chunk], sigma) for i in range(0, x.shape[0], chunk)])
    return torch.cat([fn(x[i:i + chunk], sigma[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


# ----------------------------------------------------------------------------
# The two trees.


def make_tree(origin: Sequence[float], angle: float, rng: np.random.RandomState, depth: int = 7,
              length: float = 0.5, width: float = 0.035, spread: float = 0.55, length_decay: float = 0.72,
              width_decay: float = 0.78, mass_decay: float = 0.5, elongation: float = 3.0) -> Tuple[np.ndarray, ...]:
    """One tree: a trunk from `origin` in direction `angle` that splits in two `depth - 1` times,
    children shrinking (length, width) and turning by about +-`spread` radians, all slightly randomised.
    Each branch is a row of components elongated along it; branch masses fall by `mass_decay` per level.
    Returns unnormalised (mu [K, 2], cov [K, 2, 2], weight [K])."""
    mus, covs, weights = [], [], []

    def branch(start: np.ndarray, angle: float, length: float, width: float, mass: float, level: int) -> None:
        along = np.array([np.cos(angle), np.sin(angle)])
        across = np.array([-along[1], along[0]])
        # Components spaced so that their along-branch std is `elongation` times the width and the row
        # looks continuous (spacing = 2 std keeps the ripple of the sum of Gaussians at ~1%).
        num = max(int(round(length / (2 * elongation * width))), 1)
        std_along = 0.5 * length / num
        for i in range(num):
            mus.append(start + (i + 0.5) / num * length * along)
            covs.append(std_along ** 2 * np.outer(along, along) + width ** 2 * np.outer(across, across))
            weights.append(mass / num)
        if level + 1 < depth:
            end = start + length * along
            for side in (-1, 1):
                turn = side * spread * rng.uniform(0.7, 1.3)
                branch(end, angle + turn, length * length_decay * rng.uniform(0.85, 1.15),
                       width * width_decay * rng.uniform(0.9, 1.1), mass * mass_decay * rng.uniform(0.7, 1.3),
                       level + 1)

    branch(np.asarray(origin, dtype=np.float64), angle, length, width, 1.0, 0)
    return np.stack(mus), np.stack(covs), np.array(weights)


def toy_gmm(classes: str = "AB", depth: int = 7, seed: int = 3, device: Union[str, torch.device] = "cpu",
            dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """The toy distribution: class A grows up and to the right from the origin, class B down and to the
    left; the classes have equal probability. `classes` selects a class ('A', 'B') or the union ('AB')."""
    parts = [make_tree((0.0, 0.0), angle, np.random.RandomState([seed, i]), depth=depth)
             for i, angle in enumerate([np.pi / 4, np.pi * 5 / 4])]
    mu = np.concatenate([p[0] for p in parts])
    cov = np.concatenate([p[1] for p in parts])
    weight = np.concatenate([p[2] / p[2].sum() / len(parts) for p in parts])
    label = np.concatenate([np.full(len(p[2]), i) for i, p in enumerate(parts)])
    gmm = GaussianMixture(torch.from_numpy(mu), torch.from_numpy(cov), torch.from_numpy(weight),
                          torch.from_numpy(label).long())
    return gmm.select(classes).to(device, dtype)


# ----------------------------------------------------------------------------
# The denoiser network: a small magnitude-preserving MLP with EDM preconditioning.


def _normalize(w: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Scale every row of w to norm sqrt(fan_in) (as the EDM2 network does)."""
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float32)
    return w / (eps + norm / np.sqrt(w.shape[1])).to(w.dtype)


def _mp_silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) / 0.596  # unit-variance SiLU for unit-normal inputs


class ToyLinear(torch.nn.Module):
    """Linear layer with unit-norm weight rows; in training mode the stored weights are also kept
    normalised (forced weight normalisation), which keeps the effective learning rate steady."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]))

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(_normalize(w))
        w = _normalize(w) * (gain / np.sqrt(w.shape[1]))
        return x @ w.t().to(x.dtype)


class ToyNet(torch.nn.Module):
    """D(x; sigma, class) for x in R^2: `num_layers` hidden layers of `hidden_dim` units.

    Inputs are c_in x, Fourier features of c_noise = log(sigma)/4, a constant, and (when label_dim > 0)
    the one-hot class (all zeros = unconditional). `classes` records which classes it was trained on.
    Call as net(x, sigma, class_labels=None, return_logvar=False); the log-variance head models the
    uncertainty of the loss per sigma (EDM2 loss weighting)."""

    def __init__(self, num_layers: int = 4, hidden_dim: int = 64, label_dim: int = 0, classes: str = "A",
                 sigma_data: float = 0.5, noise_features: int = 16):
        super().__init__()
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.label_dim = label_dim
        self.classes = classes
        self.sigma_data = sigma_data
        self.register_buffer("freqs", 2 * np.pi * torch.randn(noise_features))
        self.register_buffer("phases", 2 * np.pi * torch.rand(noise_features))
        dims = [2 + noise_features + 1 + label_dim] + [hidden_dim] * num_layers
        self.layers = torch.nn.ModuleList([ToyLinear(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.out = ToyLinear(hidden_dim, 2)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))  # starts as D = c_skip x
        self.logvar = ToyLinear(noise_features, 1)

    def fourier(self, c_noise: torch.Tensor) -> torch.Tensor:
        return torch.cos(c_noise * self.freqs + self.phases) * np.sqrt(2)

    def forward(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], class_labels: Optional[torch.Tensor] = None,
                return_logvar: bool = False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        emb = self.fourier(c_noise)
        features = [c_in * x, emb, torch.ones_like(c_noise)]
        if self.label_dim:
            labels = torch.zeros([x.shape[0], self.label_dim], device=x.device) if class_labels is None \
                else class_labels.to(torch.float32).reshape(-1, self.label_dim).expand(x.shape[0], -1)
            features.append(labels)
        y = torch.cat(features, dim=1)
        for layer in self.layers:
            y = _mp_silu(layer(y))
        D = c_skip * x + c_out * self.out(y, gain=self.out_gain)
        if return_logvar:
            return D, self.logvar(emb)
        return D


# ----------------------------------------------------------------------------
# Power-function EMA (training.phema when present, else this minimal version of the same rule).


def _std_to_exp(std: float) -> float:
    roots = np.roots([1, 7, 16 - std ** -2, 12 - std ** -2])  # spec: largest real root
    return float(roots[np.isreal(roots)].real.max())


class _PowerEMA:
    """ema <- lerp(ema, net, 1 - beta), beta = (1 - t_delta/t_next)^(gamma+1); same interface as
    training.phema.PowerFunctionEMA for a single sigma_rel."""

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.010,)):
        self.net = net
        self.stds = list(stds)
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        for std, ema in zip(self.stds, self.emas):
            beta = (1 - batch_size / cur_nimg) ** (_std_to_exp(std) + 1)
            for p_ema, p_net in zip(ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - beta)

    def get(self) -> List[Tuple[torch.nn.Module, str]]:
        for ema in self.emas:
            for b_ema, b_net in zip(ema.buffers(), self.net.buffers()):
                b_ema.copy_(b_net)
        return [(ema, f"-{std:.3f}") for std, ema in zip(self.stds, self.emas)]


def _make_ema(net: torch.nn.Module, std: float):
    try:
        from training.phema import PowerFunctionEMA
    except ImportError:
        return _PowerEMA(net, stds=[std])
    return PowerFunctionEMA(net, stds=[std])


# ----------------------------------------------------------------------------
# Training.


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def toy_learning_rate(it: int, ref_lr: float = 1e-2, ref_iter: int = 512) -> float:
    """lr = ref_lr / sqrt(max(it / ref_iter, 1)), `it` counting iterations before the step."""
    return ref_lr / np.sqrt(max(it / ref_iter, 1))


def toy_loss(net: ToyNet, y: torch.Tensor, class_labels: Optional[torch.Tensor], P_mean: float = -2.3,
             P_std: float = 1.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """EDM2 loss per element: sigma = exp(P_mean + P_std n), weight (sigma^2 + sd^2) / (sigma sd)^2,
    (weight / exp(u)) (D(y + sigma eps) - y)^2 + u with u the network's log-variance."""
    sigma = (torch.randn([y.shape[0], 1], device=y.device, generator=generator) * P_std + P_mean).exp()
    weight = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    noise = torch.randn(y.shape, device=y.device, generator=generator) * sigma
    D, logvar = net(y + noise, sigma, class_labels, return_logvar=True)
    return (weight / logvar.exp()) * (D - y) ** 2 + logvar


def _write_atomic(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_snapshot(net: ToyNet, path: str) -> None:
    """A snapshot is the bare model object: float32, eval mode, no gradients."""
    net = copy.deepcopy(net).eval().requires_grad_(False).to("cpu", torch.float32)
    _write_atomic(path, lambda f: pickle.dump(net, f))


def train_toy(outdir: Optional[str] = None, classes: str = "A", num_layers: int = 4, hidden_dim: int = 64,
              cond: bool = False, p_uncond: float = 0.1, total_iter: int = 4096, batch_size: int = 4096,
              P_mean: float = -2.3, P_std: float = 1.5, ref_lr: float = 1e-2, ref_iter: int = 512,
              ema_std: float = 0.010, snapshot_iter: int = 256, seed: int = 0, viz: bool = False,
              device: Optional[Union[str, torch.device]] = None, verbose: bool = True) -> ToyNet:
    """Train a ToyNet on samples of `classes` of the toy mixture and return its EMA (eval mode).

    The EMA (sigma_rel `ema_std`) is counted in iterations. With `outdir`, every `snapshot_iter`
    iterations and at the end the EMA is written as `iter%04d.pkl` (and with `viz` a picture of its
    samples as `iter%04d.png`). With `cond`, the net sees the class, dropped with probability `p_uncond`
    so that the same net also works unconditionally."""
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    gmm = toy_gmm(classes, device=device)
    net = ToyNet(num_layers, hidden_dim, label_dim=len(CLASS_NAMES) if cond else 0, classes=classes).to(device)
    net.train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    ema = _make_ema(net, ema_std)
    if outdir is not None:
        os.makedirs(outdir, exist_ok=True)
    viewer = SampleViewer(classes, device=device) if viz and outdir is not None else None

    def snapshot(it: int) -> None:
        ema_net = ema.get()[0][0]
        save_snapshot(ema_net, os.path.join(outdir, f"iter{it:04d}.pkl"))
        if viewer is not None:
            image = viewer(ema_net.eval(), title=f"Class {classes}, unguided, iteration {it}")
            _write_atomic(os.path.join(outdir, f"iter{it:04d}.png"), lambda f: image.save(f, format="png"))

    progress = tqdm.tqdm(range(total_iter), desc=f"train {classes}", disable=not verbose, unit="it")
    for it in progress:
        y, labels = gmm.sample(batch_size, generator=generator)
        onehot = None
        if cond:
            onehot = torch.nn.functional.one_hot(labels, len(CLASS_NAMES)).to(torch.float32)
            keep = torch.rand([batch_size, 1], device=device, generator=generator) >= p_uncond
            onehot = onehot * keep
        for g in opt.param_groups:
            g["lr"] = toy_learning_rate(it, ref_lr, ref_iter)
        opt.zero_grad(set_to_none=True)
        loss = toy_loss(net, y, onehot, P_mean=P_mean, P_std=P_std, generator=generator).mean()
        loss.backward()
        opt.step()
        ema.update(cur_nimg=it + 1, batch_size=1)  # EMA counted in iterations
        if verbose and (it % 16 == 0 or it == total_iter - 1):
            progress.set_postfix(loss=f"{loss.item():.3f}")
        if outdir is not None and snapshot_iter and ((it + 1) % snapshot_iter == 0 or it + 1 == total_iter):
            snapshot(it + 1)
    return copy.deepcopy(ema.get()[0][0]).eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Loading snapshots safely.

_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.nn.modules.container", "ModuleList"),
}


def _load_storage_from_bytes(b: bytes):
    # torch.storage._load_from_bytes runs a full (unsafe) torch.load; the storage needs none of that.
    return torch.load(io.BytesIO(b), weights_only=True)


class _ToyUnpickler(pickle.Unpickler):
    """Rebuilds toy snapshots only: this module's network classes and the torch tensor plumbing."""

    def find_class(self, module: str, name: str):
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_from_bytes
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module in ("toy_example", __name__) and name in ("ToyNet", "ToyLinear"):
            return globals()[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a toy snapshot "
                                     f"(use --trust-embedded-code for pickles you trust)")


def load_toy_net(path: str, trust_embedded_code: bool = False, device: Union[str, torch.device, None] = None):
    """Load a snapshot written by `train` (a path or URL). Only the toy network's classes are rebuilt unless
    `trust_embedded_code`, which unpickles anything (e.g. the reference's pickles with embedded source)."""
    if os.path.isfile(path):
        f = open(path, "rb")
    else:
        from dnnlib import util
        f = util.open_url(path)
    with f:
        net = pickle.load(f) if trust_embedded_code else _ToyUnpickler(f).load()
    if not isinstance(net, torch.nn.Module):
        raise pickle.UnpicklingError(f"{path} does not hold a network")
    return net.eval().requires_grad_(False).to(device or default_device())


# ----------------------------------------------------------------------------
# Sampling.

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edm_sampler(denoise: Denoiser, noise: torch.Tensor, guide: Optional[Denoiser] = None, guidance: float = 1,
                num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7) -> torch.Tensor:
    """EDM's deterministic Heun sampler (spec section 7, same defaults) from noise ~ N(0, I), for denoisers
    D(x, sigma). With guidance != 1, D = lerp(guide(x), denoise(x), guidance). A smaller sigma_max would
    start from N(0, sigma_max^2) while the true p_sigma_max is centred on the class (about (0.6, 0.6) for
    class A); at sigma_max = 5 that pulls the samples' mean ~0.05 towards the origin."""

    def D(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = denoise(x, t).to(torch.float64)
        if guidance == 1:
            return d
        return torch.lerp(guide(x, t).to(torch.float64), d, guidance)

    i = torch.arange(num_steps, dtype=torch.float64, device=noise.device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = noise.to(torch.float64) * t[0]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        d = (x - D(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if k < num_steps - 1:
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (d + d_next) / 2
        x = x_next
    return x


def net_denoiser(net: torch.nn.Module, class_idx: Optional[int] = None) -> Denoiser:
    """A network as D(x, sigma): conditional nets get the one-hot class (None = unconditional)."""
    label_dim = getattr(net, "label_dim", 0)

    @torch.no_grad()
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        labels = None
        if label_dim and class_idx is not None:
            labels = torch.nn.functional.one_hot(torch.tensor([class_idx], device=x.device), label_dim)
        param = next(net.parameters())
        return net(x.to(param.dtype), sigma.to(param.dtype), labels).to(x.dtype)

    return denoise


# ----------------------------------------------------------------------------
# Drawing (Pillow + numpy only).

EXTENT = (-1.75, 1.75, -1.75, 1.75)  # x0, x1, y0, y1: both trees
COLOR_A = np.array([236, 128, 36], dtype=np.float64)  # orange: the class being sampled
COLOR_B = np.array([150, 150, 150], dtype=np.float64)  # gray: the other class


def class_extent(gmm: "GaussianMixture", margin: float = 0.1, around_origin: float = 0.6) -> Tuple[float, ...]:
    """A square view (x0, x1, y0, y1) of the mixture's components (to 3 std) with a margin, that also shows
    `around_origin` around the origin, where the other class begins."""
    std = torch.linalg.eigvalsh(gmm.cov.to(torch.float64)).sqrt()[:, 1:].to(gmm.mu.dtype)
    lo = (gmm.mu - 3 * std).min(0).values.clamp(max=-around_origin)
    hi = (gmm.mu + 3 * std).max(0).values.clamp(min=around_origin)
    center, half = (lo + hi) / 2, (hi - lo).max().item() / 2 + margin
    return (center[0].item() - half, center[0].item() + half, center[1].item() - half, center[1].item() + half)


def _grid(size: int, extent: Sequence[float] = EXTENT) -> torch.Tensor:
    """Pixel centres [size*size, 2], row-major with y pointing up."""
    x0, x1, y0, y1 = extent
    xs = x0 + (np.arange(size) + 0.5) / size * (x1 - x0)
    ys = y1 - (np.arange(size) + 0.5) / size * (y1 - y0)
    gx, gy = np.meshgrid(xs, ys)
    return torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1))


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def _density_layer(logp_main: np.ndarray, logp_other: Optional[np.ndarray], dyn_range: float = 12.0,
                   line_step: float = 3.0, num_lines: int = 4) -> np.ndarray:
    """RGB float image: white background, the other class as a gray haze, the main class in orange with
    intensity by log-density, and thin contour lines of the main class every `line_step` nats below its peak."""
    peak = np.max(logp_main)

    def strength(logp):
        return np.clip((logp - (np.max(logp) - dyn_range)) / dyn_range, 0, 1)

    rgb = np.full(logp_main.shape + (3,), 255.0)
    if logp_other is not None:
        s = 0.45 * strength(logp_other)[..., None]
        rgb = rgb * (1 - s) + COLOR_B * s
    s = 0.15 + 0.4 * strength(logp_main)[..., None]
    s = s * (logp_main > peak - dyn_range)[..., None]
    rgb = rgb * (1 - s) + COLOR_A * s
    level = np.minimum(np.floor((peak - logp_main) / line_step), num_lines)
    edge = np.zeros(level.shape, dtype=bool)
    edge[:-1] |= level[:-1] != level[1:]
    edge[:, :-1] |= level[:, :-1] != level[:, 1:]
    rgb[edge] = rgb[edge] * 0.3 + np.array([170, 80, 10]) * 0.7
    return rgb


def render_panel(logp_main: np.ndarray, logp_other: Optional[np.ndarray], samples: Optional[np.ndarray],
                 title: str, size: int = 420, supersample: int = 3, extent: Sequence[float] = EXTENT,
                 subtitle: str = "") -> Image.Image:
    """One panel: the density image (log-densities on _grid(size)) with the samples drawn as dots at
    `supersample` times the resolution and downsampled (antialiasing), under a title bar."""
    rgb = _density_layer(logp_main.reshape(size, size), None if logp_other is None else logp_other.reshape(size, size))
    big = size * supersample
    image = Image.fromarray(np.uint8(np.clip(rgb, 0, 255) + 0.5)).resize((big, big), Image.BICUBIC).convert("RGBA")
    if samples is not None:
        dots = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(dots)
        x0, x1, y0, y1 = extent
        px = (samples[:, 0] - x0) / (x1 - x0) * big
        py = (y1 - samples[:, 1]) / (y1 - y0) * big
        r = 1.1 * supersample
        for u, v in zip(px, py):
            draw.ellipse([u - r, v - r, u + r, v + r], fill=(20, 20, 40, 150))
        image = Image.alpha_composite(image, dots)
    image = image.convert("RGB").resize((size, size), Image.LANCZOS)
    bar = 56 if subtitle else 36
    panel = Image.new("RGB", (size, size + bar), (255, 255, 255))
    panel.paste(image, (0, bar))
    draw = ImageDraw.Draw(panel)
    draw.text((size / 2, 6), title, fill=(0, 0, 0), font=_font(20), anchor="mt")
    if subtitle:
        draw.text((size / 2, 32), subtitle, fill=(90, 90, 90), font=_font(14), anchor="mt")
    draw.rectangle([0, bar, size - 1, size + bar - 1], outline=(80, 80, 80))
    return panel


class SampleViewer:
    """Renders a net's unguided samples over the true density of the classes it was trained on (the
    density image is computed once and reused for every snapshot)."""

    def __init__(self, classes: str, size: int = 256, num_samples: int = 1024, seed: int = 0,
                 device: Union[str, torch.device, None] = None):
        self.classes, self.size, self.device = classes, size, device or default_device()
        gmm = toy_gmm(classes, device=self.device, dtype=torch.float64)
        self.extent = class_extent(gmm)
        self.logp = gmm.logp(_grid(size, self.extent).to(self.device, torch.float64)).cpu().numpy()
        self.noise = torch.randn([num_samples, 2], generator=torch.Generator(self.device).manual_seed(seed),
                                 device=self.device)

    def __call__(self, net: torch.nn.Module, title: str = "") -> Image.Image:
        x = edm_sampler(net_denoiser(net, None), self.noise).cpu().numpy()
        return render_panel(self.logp, None, x, title or f"Class {self.classes}, unguided", size=self.size,
                            extent=self.extent)


def _panel_row(panels: List[Image.Image], footer: str) -> Image.Image:
    gap = 12
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels) + 2 * gap + 28
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = gap
    for p in panels:
        canvas.paste(p, (x, gap))
        x += p.width + gap
    ImageDraw.Draw(canvas).text((gap, height - gap - 20), footer, fill=(60, 60, 60), font=_font(15))
    return canvas


def quick_models(device: Union[str, torch.device, None] = None, verbose: bool = True) -> Tuple[ToyNet, ToyNet, ToyNet]:
    """Three small models trained in about a minute on a 2-core CPU, for `plot` without --net: a class-A main
    model, an unconditional (A+B) model of the same size, and a smaller, shorter-trained class-A model."""
    common = dict(num_layers=4, batch_size=4096, device=device, verbose=verbose)
    net = train_toy(classes="A", hidden_dim=64, total_iter=1024, seed=1, **common)
    uncond = train_toy(classes="AB", hidden_dim=64, total_iter=1024, seed=2, **common)
    gnet = train_toy(classes="A", hidden_dim=32, total_iter=384, seed=3, **common)
    return net, uncond, gnet


def plot_toy(net: Optional[torch.nn.Module] = None, gnet: Optional[torch.nn.Module] = None,
             uncond: Optional[torch.nn.Module] = None, guidance: float = 3.0, exact: bool = False,
             num_samples: int = 4096, seed: int = 0, size: int = 420, num_steps: int = 32,
             device: Union[str, torch.device, None] = None, verbose: bool = True) -> Tuple[Image.Image, dict]:
    """The comparison figure: true density of class A, then unguided sampling, classifier-free guidance
    (guide = the unconditional model) and autoguidance (guide = `gnet`), each as samples over the density.

    Without `net`: with `exact`, the ideal denoisers of the mixture (class A; the union as the
    unconditional guide; class A widened by 0.05 as the "bad" guide); otherwise three quickly trained
    models (see quick_models). A conditional `net` (label_dim > 0) is its own unconditional guide unless
    `uncond` is given. Returns the image and per mode the mean true log-density of its samples
    (`mean_logp`) and the fraction of them outside the region that holds 99% of the mass (`outliers`)."""
    device = torch.device(device) if device is not None else default_device()
    cls = "A"
    if net is not None:
        cls = net.classes if getattr(net, "label_dim", 0) == 0 else "A"
        if len(cls) != 1:
            raise ValueError(f"the main model must model a single class, not '{cls}'")
        if gnet is None:
            raise ValueError("autoguidance needs a guiding model (gnet)")
        if uncond is None and getattr(net, "label_dim", 0) == 0:
            raise ValueError("classifier-free guidance needs an unconditional model (uncond) for an unconditional net")
    class_idx = CLASS_NAMES.index(cls)
    other = "B" if cls == "A" else "A"
    gmm = toy_gmm(cls, device=device, dtype=torch.float64)

    if net is None and exact:
        mode = "exact denoisers"
        main = gmm.denoise
        cfg_guide = toy_gmm("AB", device=device, dtype=torch.float64).denoise
        auto_guide = gmm.widen(0.05).denoise
    else:
        if net is None:
            mode = "quickly trained models"
            net, uncond, gnet = quick_models(device=device, verbose=verbose)
        else:
            mode = "given models"
        net, gnet = net.to(device), gnet.to(device)
        main = net_denoiser(net, class_idx)
        cfg_guide = net_denoiser(uncond.to(device) if uncond is not None else net, None)
        auto_guide = net_denoiser(gnet, class_idx)

    noise = torch.randn([num_samples, 2], generator=torch.Generator(device).manual_seed(seed), device=device)
    runs = [("Unguided", main, None, 1.0),
            ("Classifier-free guidance", main, cfg_guide, guidance),
            ("Autoguidance", main, auto_guide, guidance)]
    extent = class_extent(gmm)
    grid = _grid(size, extent).to(device, torch.float64)
    logp_main = gmm.logp(grid).cpu().numpy()
    logp_other = toy_gmm(other, device=device, dtype=torch.float64).logp(grid).cpu().numpy()
    # The region holding 99% of the true mass: its log-density threshold from true samples.
    true_samples = gmm.sample(20000, generator=torch.Generator(device).manual_seed(seed))[0]
    threshold = float(torch.quantile(gmm.logp(true_samples), 0.01))
    panels = [render_panel(logp_main, logp_other, None, f"Ground truth (class {cls})", size=size, extent=extent,
                           subtitle=f"orange: class {cls}, gray: class {other}")]
    stats = {}
    for name, denoise, guide, w in tqdm.tqdm(runs, desc="sampling", disable=not verbose):
        x = edm_sampler(denoise, noise, guide=guide, guidance=w, num_steps=num_steps)
        logp = gmm.logp(x).cpu().numpy()
        stats[name] = dict(mean_logp=float(np.mean(np.maximum(logp, -20))), outliers=float(np.mean(logp < threshold)))
        title = name if w == 1 else f"{name} (w={w:g})"
        panels.append(render_panel(logp_main, logp_other, x.cpu().numpy(), title, size=size, extent=extent,
                                   subtitle=f"mean log p(x) = {stats[name]['mean_logp']:.2f},  "
                                            f"outside 99% region: {100 * stats[name]['outliers']:.1f}%"))
    footer = (f"{num_samples} samples each, {num_steps} Heun steps, {mode}. Contours every 3 nats below the peak of "
              f"p(x | {cls}); log p(x) clamped at -20 in the means; an ideal sampler has 1% outside the 99% region.")
    return _panel_row(panels, footer), stats


# ----------------------------------------------------------------------------
# Command line.


@click.group()
def cli():
    """2D toy example of autoguidance (Karras et al. 2024, Figure 2).

    \b
    Train a class-A model, an unconditional model and a small guiding model, then compare:
    python toy_example.py train --outdir=toy-A --cls=A
    python toy_example.py train --outdir=toy-AB --cls=AB
    python toy_example.py train --outdir=toy-A-small --cls=A --dim=32
    python toy_example.py plot --net=toy-A/iter4096.pkl --uncond=toy-AB/iter4096.pkl \\
        --gnet=toy-A-small/iter0512.pkl --save=out.png
    """
    # The tensors are tiny: one CPU thread is as fast as several, and far faster when other work
    # competes for the cores. OMP_NUM_THREADS, when set, still decides.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _check_classes(ctx, param, value: str) -> str:
    if not value or any(c not in CLASS_NAMES for c in value) or len(set(value)) != len(value):
        raise click.BadParameter(f"'{value}' is not one of A, B, AB")
    return "".join(sorted(value))


@cli.command()
@click.option("--outdir", help="Where to save the snapshots", metavar="DIR", type=str, required=True)
@click.option("--cls", "classes", help="Which classes to train on: A, B or AB", metavar="A|B|AB", type=str,
              default="A", show_default=True, callback=_check_classes)
@click.option("--layers", help="Number of hidden layers", metavar="INT", type=click.IntRange(min=1), default=4,
              show_default=True)
@click.option("--dim", help="Hidden units per layer", metavar="INT", type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option("--cond", help="Condition on the class (with label dropout)", is_flag=True)
@click.option("--viz", help="Also save a picture of the samples with every snapshot", is_flag=True)
@click.option("--iters", "total_iter", help="Training iterations", metavar="INT", type=click.IntRange(min=1),
              default=4096, show_default=True)
@click.option("--batch", "batch_size", help="Batch size", metavar="INT", type=click.IntRange(min=1), default=4096,
              show_default=True)
@click.option("--snap", "snapshot_iter", help="Snapshot interval in iterations (0 = only the last)", metavar="INT",
              type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--seed", help="Random seed", metavar="INT", type=int, default=0, show_default=True)
@click.option("--device", help="Device (default: cuda if available, else cpu)", metavar="STR", type=str, default=None)
def train(outdir: str, classes: str, layers: int, dim: int, cond: bool, viz: bool, total_iter: int, batch_size: int,
          snapshot_iter: int, seed: int, device: Optional[str]):
    """Train a toy denoiser; saves iter%04d.pkl snapshots (EMA, sigma_rel 0.010)."""
    device = _parse_device(device)
    train_toy(outdir=outdir, classes=classes, num_layers=layers, hidden_dim=dim, cond=cond, total_iter=total_iter,
              batch_size=batch_size, snapshot_iter=snapshot_iter or total_iter, seed=seed, viz=viz, device=device)
    click.echo(f"Saved snapshots to {outdir}")


def _parse_device(device: Optional[str]) -> torch.device:
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
        torch.empty([], device=device)
    except (RuntimeError, AssertionError) as e:
        raise click.BadParameter(f"cannot use device '{device}': {str(e).splitlines()[0]}",
                                 param_hint="--device") from None
    return device


def _load_cli(path: Optional[str], what: str, trust: bool, device: torch.device):
    if path is None:
        return None
    try:
        return load_toy_net(path, trust_embedded_code=trust, device=device)
    except FileNotFoundError:
        raise click.ClickException(f"{what}: no such file '{path}'") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise click.ClickException(f"{what}: cannot load '{path}': {message}") from None


@cli.command()
@click.option("--net", help="Main model (a one-class or a conditional snapshot)", metavar="PKL|URL", type=str)
@click.option("--gnet", help="Guiding model for autoguidance", metavar="PKL|URL", type=str)
@click.option("--uncond", help="Unconditional model for classifier-free guidance", metavar="PKL|URL", type=str)
@click.option("--guidance", help="Guidance weight", metavar="FLOAT", type=float, default=3, show_default=True)
@click.option("--exact", help="Without --net: use the exact denoisers instead of quick training", is_flag=True)
@click.option("--samples", "num_samples", help="Samples per panel", metavar="INT", type=click.IntRange(min=1),
              default=4096, show_default=True)
@click.option("--steps", "num_steps", help="Sampling steps", metavar="INT", type=click.IntRange(min=2), default=32,
              show_default=True)
@click.option("--seed", help="Random seed", metavar="INT", type=int, default=0, show_default=True)
@click.option("--size", help="Panel size in pixels", metavar="INT", type=click.IntRange(min=16), default=420,
              show_default=True)
@click.option("--save", help="Where to save the PNG", metavar="PNG", type=str, default="toy-example.png",
              show_default=True)
@click.option("--trust-embedded-code", help="Unpickle without restrictions (trusted files only)", is_flag=True)
@click.option("--device", help="Device (default: cuda if available, else cpu)", metavar="STR", type=str, default=None)
def plot(net: Optional[str], gnet: Optional[str], uncond: Optional[str], guidance: float, exact: bool,
         num_samples: int, num_steps: int, seed: int, size: int, save: str, trust_embedded_code: bool,
         device: Optional[str]):
    """Compare unguided, CFG and autoguided sampling with the true density.

    \b
    Without --net, three small models are trained first (about a minute on a CPU),
    or with --exact the exact denoisers of the mixture are used.
    """
    device = _parse_device(device)
    if net is None and (gnet is not None or uncond is not None):
        raise click.UsageError("--gnet and --uncond need --net")
    if net is not None and gnet is None:
        raise click.UsageError("--net needs --gnet (the guiding model for autoguidance)")
    if net is not None and exact:
        raise click.UsageError("--exact replaces --net; give one or the other")
    if not re.search(r"\.png$", save, re.IGNORECASE):
        raise click.BadParameter(f"'{save}' does not end in .png", param_hint="--save")
    folder = os.path.dirname(os.path.abspath(save))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"folder '{folder}' does not exist", param_hint="--save")
    nets = [_load_cli(p, what, trust_embedded_code, device) for p, what in
            [(net, "--net"), (gnet, "--gnet"), (uncond, "--uncond")]]
    try:
        image, stats = plot_toy(*nets, guidance=guidance, exact=exact, num_samples=num_samples,
                                 num_steps=num_steps, seed=seed, size=size, device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    _write_atomic(save, lambda f: image.save(f, format="png"))
    for name, st in stats.items():
        click.echo(f"{name:<26s} mean log p(x) {st['mean_logp']:7.3f}   outside 99% region {100 * st['outliers']:5.1f}%")
    click.echo(f"Saved {save}")


if __name__ == "__main__":
    import toy_example  # run the module under its import name so that snapshots pickle as toy_example.ToyNet

    toy_example.cli()
