"""Power-function EMA: the averaging profiles of EDM2 and their post-hoc reconstruction.

An EMA profile with exponent gamma averages the training trajectory w(tau), tau in [0, t], with the density p(tau) =
(gamma + 1) tau^gamma / t^(gamma + 1). Its width is described by the relative standard deviation sigma_rel
(``exp_to_std``), the quantity the tools and file names use. During training, ``PowerFunctionEMA`` tracks a few such
averages exactly (up to the step size); afterwards, any other profile is approximated by a least-squares combination
of stored snapshots (``solve_posthoc_coefficients``, Algorithm 3 of Karras et al. 2024). Times are counted in
training images. Only numpy and torch are imported, so the module can be copied.
"""

import copy
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

ArrayLike = Union[float, np.ndarray, list[float]]

# ----------------------------------------------------------------------------
# Conversions between the exponent gamma and sigma_rel.


def _scalar_or_array(x: np.ndarray, like: Any) -> Union[float, np.ndarray]:
    return float(x) if np.ndim(like) == 0 else x


def exp_to_std(exp: ArrayLike) -> Union[float, np.ndarray]:
    """sigma_rel of the power profile with exponent gamma: sqrt((g+1) / ((g+2)^2 (g+3)))."""
    g = np.asarray(exp, dtype=np.float64)
    return _scalar_or_array(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), exp)


def _std_to_exp_one(std: float) -> float:
    """Largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0 for one sigma_rel."""
    inv = 1.0 / (std * std)
    roots = np.roots(np.array([1.0, 7.0, 16.0 - inv, 12.0 - inv]))
    g = max(r.real for r in roots if abs(r.imag) <= 1e-6 * max(1.0, abs(r.real)))
    # np.roots goes through an eigenvalue solver; a few Newton steps on the cubic bring the
    # root to full float64 accuracy so that exp_to_std(std_to_exp(s)) == s to ~1e-15.
    for _ in range(3):
        f = ((g + 7.0) * g + (16.0 - inv)) * g + (12.0 - inv)
        df = (3.0 * g + 14.0) * g + (16.0 - inv)
        if df == 0:
            break
        g -= f / df
    return float(g)


def std_to_exp(std: ArrayLike) -> Union[float, np.ndarray]:
    """Exponent gamma of the power profile with sigma_rel ``std``: the inverse of ``exp_to_std`` on gamma >= 0
    (sigma_rel in (0, sqrt(1/12)]), as the largest real root of the cubic above (-1 < gamma < 0 a little beyond)."""
    s = np.asarray(std, dtype=np.float64)
    if np.any(~(s > 0)):
        raise ValueError("sigma_rel must be positive")
    return _scalar_or_array(np.vectorize(_std_to_exp_one, otypes=[np.float64])(s), std)


# ----------------------------------------------------------------------------
# Profiles, their inner products, and the post-hoc solve.


def power_function_beta(std: float, t_next: float, t_delta: float) -> float:
    """EMA decay for one training step that advances time to ``t_next`` by ``t_delta``.

    beta = (1 - t_delta / t_next)^(gamma + 1) gives the sample at t_next the weight of the profile over
    (t_next - t_delta, t_next]: the running average is the power profile under a right-endpoint rule.
    """
    return float((1.0 - t_delta / t_next) ** (std_to_exp(std) + 1.0))


def power_function_response(ofs: ArrayLike, std: ArrayLike, len: int, axis: int = 0) -> np.ndarray:
    """Discrete response of power profiles ending at ``ofs`` over the time steps 0 .. len-1 (for plotting).

    ``ofs`` and ``std`` broadcast together; the result has their shape with a new axis of length ``len``
    inserted at ``axis``, each profile normalised to sum 1 along it.
    """
    ofs, std = np.broadcast_arrays(np.asarray(ofs, dtype=np.float64), np.asarray(std, dtype=np.float64))
    gamma = np.expand_dims(np.asarray(std_to_exp(std), dtype=np.float64), axis)
    ofs = np.expand_dims(ofs, axis)
    shape = [1] * ofs.ndim
    shape[axis] = -1
    t = np.arange(len, dtype=np.float64).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        resp = np.where(t <= ofs, (gamma + 1) / ofs * (t / ofs) ** gamma, 0.0)
    return resp / np.sum(resp, axis=axis, keepdims=True)


def power_function_correlation(a_ofs: ArrayLike, a_std: ArrayLike, b_ofs: ArrayLike, b_std: ArrayLike) -> np.ndarray:
    """Inner product <p_a, p_b> = integral of p_a(tau) p_b(tau) over tau of two power profiles.

    Closed form: (ga+1)(gb+1)/(ga+gb+1) * min(ta,tb)^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)). It is
    evaluated as (ga+1)(gb+1)/(ga+gb+1) * (min/max)^g_long / max, where g_long is the exponent
    of the profile ending later: the same value without powers of large times.
    """
    ta, tb = np.asarray(a_ofs, dtype=np.float64), np.asarray(b_ofs, dtype=np.float64)
    ga, gb = np.asarray(std_to_exp(a_std), dtype=np.float64), np.asarray(std_to_exp(b_std), dtype=np.float64)
    t_min, t_max = np.minimum(ta, tb), np.maximum(ta, tb)
    g_long = np.where(ta < tb, gb, ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (t_min / t_max) ** g_long / t_max


def solve_posthoc_coefficients(
    in_ofs: ArrayLike, in_std: ArrayLike, out_ofs: ArrayLike, out_std: ArrayLike
) -> np.ndarray:
    """Weights X[i, o] (float64, [num_in, num_out]) such that sum_i X[i, o] * snapshot_i approximates profile o.

    Least squares in the space of profiles: X = A^-1 B with A[i, j] = <p_i, p_j>, B[i, o] = <p_i, p_o>, each
    column divided by its sum so that a constant trajectory is reproduced exactly. Inputs are (end time,
    sigma_rel) pairs, broadcast per side.
    """

    def flat(ofs, std):
        return [a.ravel() for a in np.broadcast_arrays(np.asarray(ofs, np.float64), np.asarray(std, np.float64))]

    (in_ofs, in_std), (out_ofs, out_std) = flat(in_ofs, in_std), flat(out_ofs, out_std)
    A = power_function_correlation(in_ofs[:, None], in_std[:, None], in_ofs[None, :], in_std[None, :])
    B = power_function_correlation(in_ofs[:, None], in_std[:, None], out_ofs[None, :], out_std[None, :])
    X = np.linalg.solve(A, B)
    return X / np.sum(X, axis=0, keepdims=True)


# ----------------------------------------------------------------------------
# EMA trackers used by the training loop.


def _make_ema_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A detached copy of ``net`` for averaging: eval mode (MPConv rewrites its weights in
    training mode, which would corrupt the average), no gradients."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    for p in ema.parameters():
        p.grad = None
    return ema


@torch.no_grad()
def _copy_buffers(src: torch.nn.Module, dst: torch.nn.Module, params: bool = False) -> None:
    """Copy the buffers (and, with ``params``, first the parameters) of ``src`` into ``dst``."""
    pairs = [*zip(src.parameters(), dst.parameters())] if params else []
    for x_src, x_dst in pairs + [*zip(src.buffers(), dst.buffers())]:
        x_dst.copy_(x_src.detach())


@torch.no_grad()
def _lerp_params(ema: torch.nn.Module, net: torch.nn.Module, weight: float) -> None:
    for p_net, p_ema in zip(net.parameters(), ema.parameters()):
        p_ema.lerp_(p_net.detach(), weight)


class PowerFunctionEMA:
    """Tracks one power-function EMA of ``net`` per sigma_rel in ``stds``.

    Call ``update(cur_nimg, batch_size)`` after every optimizer step, with the image count *after* it.
    ``get()`` refreshes the buffers from ``net`` and returns the live EMA modules as ``[(ema_net, '-0.050'),
    ...]``, which the caller copies (e.g. to float16) for a snapshot and must not modify.
    """

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        self.net = net
        self.stds = [float(std) for std in stds]
        self.emas = [_make_ema_copy(net) for _ in self.stds]

    def reset(self) -> None:
        """Restart every average at the current weights and buffers of ``net``."""
        for ema in self.emas:
            _copy_buffers(self.net, ema, params=True)
            ema.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        for std, ema in zip(self.stds, self.emas):
            _lerp_params(ema, self.net, 1.0 - power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size))

    def get(self) -> list[tuple[torch.nn.Module, str]]:
        for ema in self.emas:
            _copy_buffers(self.net, ema)
        return [(ema, f"-{std:.3f}") for std, ema in zip(self.stds, self.emas)]

    def state_dict(self) -> dict[str, Any]:
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["emas"]) != len(self.emas):
            raise ValueError(f"EMA state holds {len(state['emas'])} averages, expected {len(self.emas)}")
        self.stds = [float(std) for std in state["stds"]]
        for ema, ema_state in zip(self.emas, state["emas"]):
            ema.load_state_dict(ema_state)


class TraditionalEMA:
    """Classic exponential moving average with a half-life in Mimg and an optional ramp-up.

    The half-life is min(halflife_Mimg, cur_nimg / 1e6 * rampup_ratio) (``rampup_ratio=None``: no ramp-up),
    and each step decays by beta = 0.5^(batch_size / (half-life * 1e6)). ``get()`` returns ``[(ema_net, '')]``
    (the reference returns the bare module, which its training loop wraps so); ``state_dict()`` is the EMA
    network's own, as in the reference.
    """

    def __init__(self, net: torch.nn.Module, halflife_Mimg: float = float("inf"), rampup_ratio: float = 0.09):
        self.net = net
        self.halflife_Mimg, self.rampup_ratio = halflife_Mimg, rampup_ratio
        self.ema = _make_ema_copy(net)

    def reset(self) -> None:
        _copy_buffers(self.net, self.ema, params=True)
        self.ema.eval().requires_grad_(False)

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        """Decay applied by ``update(cur_nimg, batch_size)``."""
        halflife_Mimg = self.halflife_Mimg
        if self.rampup_ratio is not None:
            halflife_Mimg = min(halflife_Mimg, cur_nimg / 1e6 * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife_Mimg * 1e6, 1e-8))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        _lerp_params(self.ema, self.net, 1.0 - self.beta(cur_nimg, batch_size))

    def get(self) -> list[tuple[torch.nn.Module, str]]:
        _copy_buffers(self.net, self.ema)
        return [(self.ema, "")]

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
