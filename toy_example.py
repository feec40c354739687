"""The 2D toy example of "Guiding a Diffusion Model with a Bad Version of Itself" (Karras et al.,
NeurIPS 2024, arXiv 2406.02507).

The data is a tree-shaped 2D Gaussian mixture with two classes, A and B, whose density, score and
sigma-smoothed versions are known exactly. Small MLPs that model log p(x; sigma) are trained by exact
score matching (`train`); `plot` compares sampling without and with autoguidance, where the guiding
model is a smaller, shorter-trained model of the same class.

Differences from the reference implementation: everything runs on a CPU (CUDA when available),
snapshots and figures are written atomically, pickles load without running their embedded code
unless --trust-embedded-code is given, and --viz saves a picture with every snapshot instead of
opening a window.
"""

import copy
import functools
import os
import pickle
from collections.abc import Sequence
from typing import Optional, Union

import click
import numpy as np
import torch
import tqdm

import dnnlib
import training.phema
from torch_utils import misc, persistence
from training.networks_edm2 import mp_silu, normalize

PUBLISHED_NET = "https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/clsA-layers04-dim64/iter4096.pkl"
PUBLISHED_GNET = "https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/clsA-layers04-dim32/iter0512.pkl"
PUBLISHED = {"--net": PUBLISHED_NET, "--gnet": PUBLISHED_GNET}  # looked up at run time (tests replace them)
TRAIN_HINT = (
    "python toy_example.py train --outdir=toy-A-dim64 --cls=A --dim=64, then "
    "python toy_example.py train --outdir=toy-A-dim32 --cls=A --dim=32 --iterations=512, then "
    "python toy_example.py plot --net=toy-A-dim64/iter4096.pkl --gnet=toy-A-dim32/iter0512.pkl"
)

# ----------------------------------------------------------------------------
# A Gaussian mixture with exact densities and scores, also of its sigma-smoothed versions
# p(x; sigma) = p * N(0, sigma^2 I), whose components have covariances Sigma_k + sigma^2 I.


def _relative_weights(log_w: torch.Tensor):
    """exp(log_w - shift) and shift = the row maxima. Terms below e^-80 of the largest are raised to e^-80:
    exp() of large negative numbers is much slower on CPUs, and such terms lie far below float32 resolution."""
    shift = log_w.amax(-1, keepdim=True)
    return (log_w - shift).clamp_(min=-80).exp_(), shift


class GaussianMixture(torch.nn.Module):
    def __init__(self, phi: Sequence[float], mu: Sequence, Sigma: Sequence, sample_lut_size: int = 64 << 10):
        super().__init__()
        self.register_buffer("phi", torch.tensor(np.asarray(phi) / np.sum(phi), dtype=torch.float32))  # [comp]
        self.register_buffer("mu", torch.tensor(np.asarray(mu), dtype=torch.float32))  # [comp, dim]
        self.register_buffer("Sigma", torch.tensor(np.asarray(Sigma), dtype=torch.float32))  # [comp, dim, dim]

        # Sigma = Q diag(L) Q^T, so Sigma + sigma^2 I = Q diag(L + sigma^2) Q^T for every sigma.
        L, Q = torch.linalg.eigh(self.Sigma)
        self.register_buffer("_L", L)  # [comp, dim]
        self.register_buffer("_Q", Q)  # [comp, dim, dim], eigenvectors in the columns
        self.register_buffer("_mu_q", torch.einsum("kj,kji->ki", self.mu, Q))  # mu in the eigenbasis

        # Sampling picks a component by a uniform index into a table where component k fills a
        # share phi_k of the entries.
        self.register_buffer("_sample_lut", torch.zeros(sample_lut_size, dtype=torch.int64))
        edges = torch.cat([torch.zeros_like(self.phi[:1]), self.phi.cumsum(0)])
        edges = (edges * sample_lut_size + 0.5).to(torch.int32)
        for idx, (begin, end) in enumerate(zip(edges[:-1], edges[1:])):
            self._sample_lut[begin:end] = idx

    def _eval(self, x: torch.Tensor, sigma: torch.Tensor):
        """For x [n, dim], sigma [n]: log(phi_k N(x; mu_k, Sigma_k')) [n, comp], Sigma_k' = Sigma_k + sigma^2 I,
        and a function r -> sum_k r_k Sigma_k'^-1 (mu_k - x) [n, dim]. Works along the eigenvectors q_ki of
        Sigma_k, which Sigma_k' shares, with [n, comp] matrices only: this is most of the training time."""
        if (sigma == sigma[0]).all():
            sigma = sigma[:1]  # one sigma for all: the eigenvalues are the same for every sample
        quad, det, b = 0, 1, []
        for i in range(x.shape[-1]):
            a = torch.addmm(self._mu_q[:, i], x, self._Q[:, :, i].t(), alpha=-1)  # q_ki . (mu_k - x)
            L = self._L[:, i] + sigma[:, None] ** 2  # eigenvalue of Sigma_k'
            b.append(a / L)
            quad = a.mul_(b[-1]) if i == 0 else quad.addcmul_(a, b[-1])  # (mu_k - x)^T Sigma_k'^-1 (mu_k - x)
            det = L * det
        log_w = (self.phi.log() - 0.5 * x.shape[-1] * np.log(2 * np.pi)) - 0.5 * (quad + det.log())
        return log_w, lambda r: sum((r * b_i) @ self._Q[:, :, i] for i, b_i in enumerate(b))

    def _batched(self, fn, x, sigma, max_batch_size: int = 512) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1])
        xs, ss = x.reshape(-1, x.shape[-1]).split(max_batch_size), sigma.reshape(-1).split(max_batch_size)
        out = torch.cat([fn(*self._eval(xx, ss_)) for xx, ss_ in zip(xs, ss)])
        return out.reshape(*x.shape[:-1], *out.shape[1:])

    def logp(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        """log p(x; sigma), shape x.shape[:-1]."""

        def fn(log_w, precision_times):
            w, shift = _relative_weights(log_w)
            return w.sum(-1).log() + shift[:, 0]

        return self._batched(fn, x, sigma)

    def pdf(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        return self.logp(x, sigma).exp()

    def score(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        """grad_x log p(x; sigma) = sum_k r_k(x) Sigma_k'^-1 (mu_k - x), r_k the component posteriors."""

        def fn(log_w, precision_times):
            w = _relative_weights(log_w)[0]
            return precision_times(w / w.sum(-1, keepdim=True))

        return self._batched(fn, x, sigma)

    def sample(self, shape, sigma: Union[float, torch.Tensor] = 0, generator: Optional[torch.Generator] = None):
        """Samples of p(x; sigma), shape [*shape, dim]."""
        device = self.mu.device
        sigma = torch.as_tensor(sigma, dtype=self.mu.dtype, device=device).broadcast_to(shape)
        i = self._sample_lut[torch.randint(len(self._sample_lut), size=sigma.shape, device=device, generator=generator)]
        L = self._L[i] + sigma[..., None] ** 2
        n = torch.randn(L.shape, dtype=L.dtype, device=device, generator=generator)
        return self.mu[i] + (self._Q[i] * (L.sqrt() * n)[..., None, :]).sum(-1)  # mu + Q diag(sqrt(L)) n


@functools.lru_cache(None)
def gt(
    classes: str = "A",
    device: torch.device = torch.device("cpu"),
    seed: int = 2,
    origin: Sequence[float] = (0.0030, 0.0325),
    scale: Sequence[float] = (1.3136, 1.3844),
) -> GaussianMixture:
    """The ground truth of the given classes ('A', 'B' or 'AB'): two binary trees grown from `origin`,
    class A at angle pi/4 and class B at 5 pi/4, every branch a row of 8 elongated components."""
    rnd = np.random.RandomState(seed)
    origin, scale = np.asarray(origin), np.asarray(scale)
    comps = []  # (class, phi, mu, Sigma)

    def branch(cls, depth, pos, angle):
        if depth >= 7:
            return
        u = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * (0.8**depth) * (1 + 0.2 * rnd.randn())
        thickness = 0.2 * (0.8**depth) / length  # across the branch, relative to along it
        size = scale * length * 0.06
        uu = np.outer(u, u)
        Sigma = (uu + (np.eye(2) - uu) * thickness**2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, num=8):
            comps.append((cls, length * (0.5**depth), (pos + u * length * t) * scale, Sigma))
        for sign in [1, -1]:
            branch(cls, depth + 1, pos + u * length, angle + sign * (0.7**depth) * (1 + 0.2 * rnd.randn()))

    branch("A", 0, origin, np.pi * 0.25)
    branch("B", 0, origin, np.pi * 1.25)
    sel = [c for c in comps if c[0] in classes]
    return GaussianMixture([c[1] for c in sel], [c[2] for c in sel], [c[3] for c in sel]).to(device)


# ----------------------------------------------------------------------------
# The model: an MLP of magnitude-preserving layers (as in the EDM2 network) that outputs
# log p(x; sigma) up to a constant; the score is its gradient.


@persistence.persistent_class
class MPSiLU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)


@persistence.persistent_class
class MPLinear(torch.nn.Module):
    """Linear map with forced weight normalisation: unit-norm weight rows (normalised, divided by
    sqrt(fan_in)); in training mode the stored weight is first overwritten by its normalised copy."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_dim, in_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        w = normalize(self.weight) / np.sqrt(self.weight[0].numel())
        return x @ w.t()


@persistence.persistent_class
class ToyModel(torch.nn.Module):
    def __init__(self, in_dim: int = 2, num_layers: int = 4, hidden_dim: int = 64, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.layers = torch.nn.Sequential()
        self.layers.append(MPLinear(in_dim + 2, hidden_dim))
        for _ in range(num_layers):
            self.layers.append(MPSiLU())
            self.layers.append(MPLinear(hidden_dim, hidden_dim))
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        """log p(x; sigma) up to a constant: mean(y^2) gain / sigma - |x'|^2 / 2, x' = x / sqrt(sigma_data^2 + sigma^2)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        x = x / (self.sigma_data**2 + sigma**2).sqrt()
        y = torch.cat([x, sigma.log() / 4, torch.ones_like(sigma)], dim=-1)
        for layer in self.layers:
            y = layer(y)
        return (y**2).mean(-1) * self.gain / sigma.squeeze(-1) - (x**2).sum(-1) / 2

    def logp(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        return self(x, sigma)

    def pdf(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0) -> torch.Tensor:
        logp = self.logp(x, sigma)
        return (logp - logp.max()).exp()  # unnormalised

    def score(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0, graph: bool = False) -> torch.Tensor:
        """grad_x log p(x; sigma) by autograd; `graph` keeps it differentiable (for training)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.logp(x, sigma).sum(), x, create_graph=graph)[0]


TOY_CLASSES = {"ToyModel": ToyModel, "MPLinear": MPLinear, "MPSiLU": MPSiLU}

# ----------------------------------------------------------------------------
# Training by exact score matching, with a power-function EMA (sigma_rel 0.010, counted in iterations).


def score_matching_loss(
    net: torch.nn.Module, classes: str, samples: torch.Tensor, sigma: torch.Tensor, graph: bool = False
) -> torch.Tensor:
    """E[sigma^2 |score_gt - score_net|^2] over noisy samples x ~ p(x; sigma)."""
    gt_scores = gt(classes, samples.device).score(samples, sigma)
    net_scores = net.score(samples, sigma, graph=graph)
    return ((sigma**2) * ((gt_scores - net_scores) ** 2).mean(-1)).mean()


def do_train(
    classes: str = "A",
    num_layers: int = 4,
    hidden_dim: int = 64,
    batch_size: int = 4 << 10,
    total_iter: int = 4 << 10,
    seed: int = 0,
    P_mean: float = -2.3,
    P_std: float = 1.5,
    sigma_data: float = 0.5,
    lr_ref: float = 1e-2,
    lr_iter: int = 512,
    ema_std: float = 0.010,
    pkl_pattern: Optional[str] = None,
    pkl_iter: int = 256,
    viz: bool = False,
    device: Optional[torch.device] = None,
    verbose: bool = True,
) -> ToyModel:
    """Train a ToyModel; saves `pkl_pattern % iteration` (the EMA, with a PNG of it when `viz`)
    every `pkl_iter` iterations. Returns the final EMA model."""
    device = torch.device(device) if device is not None else misc.default_device()
    torch.manual_seed(seed)
    net = ToyModel(num_layers=num_layers, hidden_dim=hidden_dim, sigma_data=sigma_data)
    net = net.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    pbar = tqdm.tqdm(range(total_iter), disable=not verbose)
    for iter_idx in pbar:
        opt.param_groups[0]["lr"] = lr_ref / np.sqrt(max(iter_idx / lr_iter, 1))
        opt.zero_grad()
        sigma = (torch.randn(batch_size, device=device) * P_std + P_mean).exp()
        samples = gt(classes, device).sample(batch_size, sigma)
        loss = score_matching_loss(net, classes, samples, sigma, graph=True)
        loss.backward()
        opt.step()
        pbar.set_postfix_str(f"loss = {loss.item():.6f}")

        beta = training.phema.power_function_beta(std=ema_std, t_next=iter_idx + 1, t_delta=1)
        for p_net, p_ema in zip(net.parameters(), ema.parameters()):
            p_ema.lerp_(p_net.detach(), 1 - beta)

        if pkl_pattern is not None and (iter_idx + 1) % pkl_iter == 0:
            with dnnlib.util.atomic_write(pkl_pattern % (iter_idx + 1)) as f:
                pickle.dump(copy.deepcopy(ema).cpu(), f)
            if viz:
                save_samples_figure(ema, os.path.splitext(pkl_pattern % (iter_idx + 1))[0] + ".png", device=device)
    return ema


# ----------------------------------------------------------------------------
# Sampling: EDM's Heun sampler (Algorithm 1 of Karras et al. 2022) on the guided denoiser
# D(x; sigma) = x + sigma^2 lerp(score_gnet, score_net, w), which for w = 1 is the main model alone.


@torch.no_grad()
def do_sample(
    net: torch.nn.Module,
    x_init: torch.Tensor,
    guidance: float = 1,
    gnet: Optional[torch.nn.Module] = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 5,
    rho: float = 7,
    return_traj: bool = False,
) -> torch.Tensor:
    """Samples [N, dim] from `x_init` (noise at sigma_max), or with `return_traj` all steps [num_steps + 1, N, dim]."""

    def denoise(x, sigma):
        score = net.score(x, sigma)
        if gnet is not None:
            score = gnet.score(x, sigma).lerp(score, guidance)
        return x + score * (sigma**2)

    step_indices = torch.arange(num_steps, dtype=torch.float32, device=x_init.device)
    t_steps = (
        sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    x_cur = x_init
    trajectory = [x_cur]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:  # second-order correction
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x_cur = x_next
        trajectory.append(x_cur)
    return torch.stack(trajectory) if return_traj else trajectory[-1]


# ----------------------------------------------------------------------------
# Drawing.


def _grid(view_x: float, view_y: float, view_size: float, resolution: int, device: torch.device) -> torch.Tensor:
    line = torch.linspace(-view_size, view_size, steps=resolution, device=device)
    return torch.stack(torch.meshgrid(line + view_x, line + view_y, indexing="xy"), dim=-1)  # [y, x, 2]


@functools.lru_cache(8)
def _gt_logp_on_grid(classes: str, *grid_args) -> torch.Tensor:
    return gt(classes, grid_args[-1]).logp(_grid(*grid_args))  # the same few views in every panel


def do_plot(
    ax,
    net: Optional[torch.nn.Module] = None,
    gnet: Optional[torch.nn.Module] = None,
    guidance: float = 1,
    elems: Sequence[str] = ("gt_uncond", "gt_outline", "samples"),
    view_x: float = 0.30,
    view_y: float = 0.30,
    view_size: float = 1.2,
    grid_resolution: int = 400,
    num_samples: int = 1 << 14,
    seed: int = 1,
    sample_distance: float = 0,
    sigma_max: float = 5,
    line_alpha: float = 0.02,
    device: Optional[torch.device] = None,
) -> None:
    """Draw on the matplotlib axes `ax`, in this order, the chosen elements: gt_uncond and gt_outline
    (regions of classes A+B and A), p_net, p_gnet, p_ratio (densities of the models and their ratio),
    gt_line (the class-A border), trajectories, samples_before and samples. Sampling starts from
    samples of class A at sigma_max (kept only `sample_distance` apart); without `net` it follows
    the ground truth."""
    device = torch.device(device) if device is not None else misc.default_device()
    if any(e in elems for e in ["samples", "trajectories", "samples_before"]):
        samples = gt("A", device).sample(num_samples, sigma_max, generator=torch.Generator(device).manual_seed(seed))
        if sample_distance > 0:  # keep a point only if it is far enough from every point kept before it
            ok = torch.ones(len(samples), dtype=torch.bool, device=device)
            for i in range(1, len(samples)):
                ok[i] = (samples[i] - samples[:i][ok[:i]]).norm(dim=-1).min() >= sample_distance
            samples = samples[ok]
        traj = do_sample(net or gt("A", device), samples, guidance, gnet, sigma_max=sigma_max, return_traj=True)
        traj = traj.cpu().numpy()

    grid_args = (view_x, view_y, view_size, grid_resolution, device)
    gridxy = _grid(*grid_args)
    gx, gy = gridxy[0, :, 0].cpu().numpy(), gridxy[:, 0, 1].cpu().numpy()
    ax.set_xlim(gx[0], gx[-1])
    ax.set_ylim(gy[0], gy[-1])
    ax.set_aspect("equal")
    ax.set_axis_off()

    def contours(
        logp, levels, colors=None, cmap=None, alpha=1.0, linecolors="black", linealpha=1.0, linewidth=2.5, fill=True
    ):
        # Levels are in -sqrt(max log p - log p): fine steps near the peak, wider ones in the tails.
        v = -(logp.max() - logp).clamp(min=0).sqrt().cpu().numpy()
        if fill:
            ax.contourf(gx, gy, v, levels=levels, extend="max", colors=colors, cmap=cmap, alpha=alpha)
        ax.contour(
            gx, gy, v, levels=levels, colors=linecolors, alpha=linealpha, linestyles="solid", linewidths=linewidth
        )

    sigma_min = 0.002  # the models' densities are drawn at the last noise level of sampling
    outline = dict(levels=[-2.12, 0], linewidth=1.5)  # 4.5 nats below the peak
    with torch.no_grad():
        gt_a = functools.partial(_gt_logp_on_grid, "A", *grid_args)
        if "gt_uncond" in elems:
            contours(_gt_logp_on_grid("AB", *grid_args), colors=[[0.9] * 3], linecolors=[[0.7] * 3], **outline)
        if "gt_outline" in elems:
            contours(gt_a(), colors=[[1.0, 0.8, 0.6]], linecolors=[[0.8, 0.6, 0.5]], **outline)
        if "p_net" in elems:
            contours(net.logp(gridxy, sigma_min), levels=np.linspace(-2.5, 0, num=15), cmap="Greens", linealpha=0.2)
        if "p_gnet" in elems:
            contours(gnet.logp(gridxy, sigma_min), levels=np.linspace(-2.5, 0, num=15), cmap="Reds", linealpha=0.2)
        if "p_ratio" in elems:
            ratio = net.logp(gridxy, sigma_min) - gnet.logp(gridxy, sigma_min)
            contours(ratio, levels=np.linspace(-2.2, 0, num=15), cmap="Blues", linealpha=0.2)
        if "gt_line" in elems:
            contours(gt_a(), linecolors=[[0.8, 0.4, 0.1]], fill=False, **outline)
    if "trajectories" in elems:
        import matplotlib.collections

        lines = traj.transpose(1, 0, 2)
        ax.add_collection(matplotlib.collections.LineCollection(lines, colors="black", alpha=line_alpha, linewidths=2))
    if "samples_before" in elems:
        ax.plot(*traj[0].T, ".", color="C1", markeredgecolor="none", markersize=15)
    if "samples" in elems or "trajectories" in elems:
        alpha, size = (0.25, 8) if "samples" in elems else (1, 12)
        ax.plot(*traj[-1].T, ".", color="black", markeredgecolor="none", alpha=alpha, markersize=size)


def _savefig(fig, path: str, dpi: int) -> None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with dnnlib.util.atomic_path(path) as temp:
        fig.savefig(temp, dpi=dpi, format=ext)


def save_samples_figure(net: torch.nn.Module, path: str, device: Optional[torch.device] = None) -> None:
    """The unguided samples of `net` over the ground truth (the --viz picture of a snapshot)."""
    import matplotlib.figure

    fig = matplotlib.figure.Figure(figsize=[12, 12], dpi=75)
    ax = fig.add_axes([0, 0, 1, 1])
    do_plot(ax, net=net, elems={"gt_uncond", "gt_outline", "samples"}, num_samples=1 << 13, device=device)
    _savefig(fig, path, dpi=75)


def plot_figure(
    net: torch.nn.Module,
    gnet: torch.nn.Module,
    guidance: float = 3,
    num_samples: int = 1 << 14,
    device: Optional[torch.device] = None,
):
    """The 2x4 figure of the paper's toy: samples over the whole tree (top row) and the densities of the
    models on a zoomed-in branch (bottom row). Returns the matplotlib figure (48x25 in)."""
    import matplotlib.pyplot as plt

    zoom = dict(view_x=0.45, view_y=1.22, view_size=0.3)
    zoom_traj = dict(num_samples=num_samples // 4, sample_distance=0.045, sigma_max=0.03, line_alpha=0.5)
    guided = dict(net=net, gnet=gnet, guidance=guidance)
    samples = {"gt_uncond", "gt_outline", "samples"}
    trajectories = {"gt_uncond", "gt_outline", "trajectories", "samples_before"}
    panels = [
        ("Ground truth distribution", dict(elems=samples)),
        ("Sample distribution without guidance", dict(net=net, elems=samples)),
        ("Sample distribution with guidance", dict(**guided, elems=samples)),
        ("Trajectories without guidance", dict(net=net, elems=trajectories)),
        ("PDF of main model", dict(net=net, elems={"p_net", "gt_line"}, **zoom)),
        ("PDF of guiding model", dict(gnet=gnet, elems={"p_gnet", "gt_line"}, **zoom)),
        ("PDF ratio (main / guiding)", dict(net=net, gnet=gnet, elems={"p_ratio", "gt_line"}, **zoom)),
        ("Trajectories with guidance", dict(**guided, **zoom, **zoom_traj, elems=trajectories)),
    ]
    with plt.rc_context({"font.size": 28}):
        fig = plt.figure(figsize=[48, 25], dpi=40, tight_layout=True)
        for idx, (title, kwargs) in enumerate(panels):
            ax = fig.add_subplot(2, 4, idx + 1)
            ax.set_title(title)
            do_plot(ax, **{"num_samples": num_samples, **kwargs}, device=device)
    return fig


# ----------------------------------------------------------------------------
# Loading.


def load_toy_model(
    url: str, trust_embedded_code: bool = False, device: Optional[torch.device] = None
) -> torch.nn.Module:
    """A toy model pickle (path or URL, e.g. a snapshot of `train` or of the reference's toy), rebuilt
    with this module's classes unless `trust_embedded_code` runs the code it carries."""
    with dnnlib.util.open_url(url) as f:
        net = persistence.load_pickle(f, trust_embedded_code=trust_embedded_code, extra_classes=TOY_CLASSES)
    if not isinstance(net, torch.nn.Module) or not callable(getattr(net, "score", None)):
        raise ValueError(f"{url} holds a {type(net).__name__}, not a toy model")
    return net.to(device or misc.default_device()).eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Command line.


# fmt: off
@click.group()
# fmt: on
def cmdline():
    """2D toy example from the paper "Guiding a Diffusion Model with a Bad Version of Itself".

    \b
    # Visualize sampling with and without autoguidance, using the published models
    python toy_example.py plot --save=toy-example.png

    \b
    # Train the two models locally and plot them
    python toy_example.py train --outdir=toy-A-dim64 --cls=A --dim=64
    python toy_example.py train --outdir=toy-A-dim32 --cls=A --dim=32 --iterations=512
    python toy_example.py plot --net=toy-A-dim64/iter4096.pkl --gnet=toy-A-dim32/iter0512.pkl --save=toy.png
    """
    # The tensors are small: on a shared CPU one thread is faster than several. OMP_NUM_THREADS decides when set.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _device(device: Optional[str]) -> torch.device:
    try:
        device = torch.device(device) if device else misc.default_device()
        torch.empty([], device=device)
    except (RuntimeError, AssertionError) as err:
        raise click.BadParameter(dnnlib.util.one_line(err), param_hint="--device") from None
    return device


_int_option = functools.partial(click.option, metavar="INT", type=click.IntRange(min=1), show_default=True)
_device_option = click.option("--device", help="[extra] Device  [default: cuda if available, else cpu]", metavar="STR")


# fmt: off
@cmdline.command()
@click.option("--outdir", help="Output directory", metavar="DIR", type=str, required=True)
@click.option("--cls", help="Target classes", type=click.Choice(["A", "B", "AB"]), default="A", show_default=True)
@_int_option("--layers", help="Number of hidden layers", default=4)
@_int_option("--dim", help="Hidden dimension", default=64)
@click.option("--viz", help="Save a picture of the samples with every snapshot", metavar="BOOL", type=bool, is_flag=False, flag_value=True, default=False, show_default=True)
@_int_option("--iterations", help="[extra] Training iterations", default=4096)
@_int_option("--batch", help="[extra] Batch size", default=4096)
@_int_option("--snap", help="[extra] Snapshot interval in iterations", default=256)
@_device_option
# fmt: on
def train(
    outdir: str,
    cls: str,
    layers: int,
    dim: int,
    viz: bool,
    iterations: int,
    batch: int,
    snap: int,
    device: Optional[str],
):
    """Train a 2D toy model with the given parameters; saves DIR/iter%04d.pkl."""
    device = _device(device)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f"'{outdir}' exists and is not a folder", param_hint="--outdir")
    try:
        os.makedirs(outdir, exist_ok=True)
        dnnlib.util.remove_stale_temp_files(outdir)
        pattern = os.path.join(outdir, "iter%04d.pkl")
        do_train(cls, layers, dim, batch, iterations, pkl_pattern=pattern, pkl_iter=snap, viz=viz, device=device)
    except OSError as err:
        raise click.ClickException(dnnlib.util.one_line(err)) from None
    click.echo(f"Saved snapshots to {outdir}")


# fmt: off
@cmdline.command()
@click.option("--net", help="Main model  [default: published class-A 4x64 model, iteration 4096]", metavar="PKL|URL")
@click.option("--gnet", help="Guiding model  [default: published class-A 4x32 model, iteration 512]", metavar="PKL|URL")
@click.option("--guidance", help="Guidance weight", metavar="FLOAT", type=float, default=3, show_default=True)
@click.option("--save", help="Save the figure (PNG or PDF) instead of displaying it", metavar="PNG|PDF", type=str)
@click.option("--trust-embedded-code", help="[extra] Run the code the pickles carry (trusted files only)", is_flag=True)
@_int_option("--samples", help="[extra] Top-row samples (a quarter in the bottom row)", type=click.IntRange(4), default=1 << 14)
@_device_option
# fmt: on
def plot(
    net: Optional[str],
    gnet: Optional[str],
    guidance: float,
    save: Optional[str],
    trust_embedded_code: bool,
    samples: int,
    device: Optional[str],
):
    """Visualize sampling distributions with and without guidance."""
    import matplotlib.pyplot as plt

    device = _device(device)
    if save is not None:
        if os.path.splitext(save)[1].lower() not in (".png", ".pdf"):
            raise click.BadParameter(f"'{save}' does not end in .png or .pdf", param_hint="--save")
        if os.path.isdir(save):
            raise click.BadParameter(f"'{save}' is a folder", param_hint="--save")
    elif plt.get_backend().lower() in ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template"):
        raise click.UsageError("no display to show the figure on; give --save=FILE.png")

    click.echo("Loading models...")
    models = []
    for url, what in [(net, "--net"), (gnet, "--gnet")]:
        try:
            models.append(
                load_toy_model(url or PUBLISHED[what], trust_embedded_code=trust_embedded_code, device=device)
            )
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            if url is None and isinstance(err, OSError):
                raise click.ClickException(
                    f"cannot download the published {what} ({dnnlib.util.one_line(err)}); "
                    f"train the models locally: {TRAIN_HINT}"
                ) from None
            raise click.ClickException(f"{what}: {dnnlib.util.one_line(err)}") from None

    click.echo("Drawing plots...")
    fig = plot_figure(*models, guidance=guidance, num_samples=samples, device=device)
    if save is None:
        plt.show()
        return
    try:
        _savefig(fig, save, dpi=80)
    except OSError as err:
        raise click.ClickException(dnnlib.util.one_line(err)) from None
    finally:
        plt.close(fig)
    click.echo(f"Saved {save}")


if __name__ == "__main__":
    import toy_example  # run under the import name, so that snapshots record module 'toy_example'

    toy_example.cmdline()
