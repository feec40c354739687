"""Tests for training/phema.py: the power-function EMA math and the EMA trackers.

Every expected value comes from an independent computation: the closed forms of the EDM2 paper (Section 3 and its appendix on post-hoc EMA)
evaluated directly, scipy numerical integration, or the analytic power-function average of
a known trajectory.
"""

import copy
import io
import math

import numpy as np
import pytest
import scipy.integrate
import torch

from training import phema

# ----------------------------------------------------------------------------
# Helpers written independently of the module under test.


def profile(tau, t, gamma):
    """Normalised power profile (gamma+1) tau^gamma / t^(gamma+1) on [0, t], zero after."""
    return np.where(tau <= t, (gamma + 1) * (tau / t) ** gamma / t, 0.0)


class TinyNet(torch.nn.Module):
    """A parameter vector we set by hand, and a buffer."""

    def __init__(self, n=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("b", torch.arange(n, dtype=torch.float32))


# ----------------------------------------------------------------------------
# exp_to_std / std_to_exp.


def test_std_exp_roundtrip_over_range():
    stds = np.concatenate([np.geomspace(1e-5, 0.288, 3000), np.linspace(0.25, 0.288, 1000)])
    gammas = phema.std_to_exp(stds)
    assert gammas.shape == stds.shape
    back = phema.exp_to_std(gammas)
    assert np.max(np.abs(back - stds)) < 1e-10
    assert np.max(np.abs(back - stds) / stds) < 1e-10
    # And the other way round, for gamma >= 0 (the branch std_to_exp picks).
    g = np.concatenate([[0.0], np.geomspace(1e-4, 1e5, 2000)])
    g_back = phema.std_to_exp(phema.exp_to_std(g))
    assert np.max(np.abs(g_back - g) / np.maximum(g, 1)) < 1e-10


def test_exp_to_std_closed_form_and_cubic():
    # gamma = 0 is the flat average of [0, t]: sigma_rel = sqrt(1/12).
    assert phema.exp_to_std(0.0) == pytest.approx(math.sqrt(1 / 12), rel=1e-15)
    assert isinstance(phema.exp_to_std(0.0), float)
    assert isinstance(phema.std_to_exp(0.1), float)
    # sigma_rel from the definition: the standard deviation of tau / t under the profile.
    for gamma in [0.0, 0.5, 6.94, 16.97, 100.0]:
        mean = scipy.integrate.quad(lambda u, g=gamma: u * profile(u, 1.0, g), 0, 1)[0]
        var = scipy.integrate.quad(lambda u, g=gamma, m=mean: (u - m) ** 2 * profile(u, 1.0, g), 0, 1)[0]
        assert phema.exp_to_std(gamma) == pytest.approx(math.sqrt(var), rel=1e-8)
    # std_to_exp is a root of the cubic relating gamma to sigma_rel in the EDM2 paper (Section 3), and the largest real one.
    for std in [0.01, 0.05, 0.1, 0.2, 0.28]:
        g = phema.std_to_exp(std)
        inv = std**-2
        coefs = [1, 7, 16 - inv, 12 - inv]
        assert abs(np.polyval(coefs, g)) < 1e-9 * inv * max(g, 1)
        real_roots = [r.real for r in np.roots(coefs) if abs(r.imag) < 1e-9]
        assert g == pytest.approx(max(real_roots), rel=1e-9)
    # The paper's two training EMAs.
    assert phema.std_to_exp(0.050) == pytest.approx(16.97, abs=0.01)
    assert phema.std_to_exp(0.100) == pytest.approx(6.94, abs=0.01)


# ----------------------------------------------------------------------------
# power_function_correlation / solve_posthoc_coefficients.


@pytest.mark.parametrize(
    "ta, sa, tb, sb",
    [
        (1.0, 0.05, 1.0, 0.10),
        (0.6, 0.10, 1.0, 0.05),
        (1.0, 0.02, 0.3, 0.25),
        (2.5, 0.15, 2.5, 0.15),
        (1e6, 0.05, 7e5, 0.1),
    ],
)
def test_correlation_equals_numerical_integral(ta, sa, tb, sb):
    ga, gb = phema.std_to_exp(sa), phema.std_to_exp(sb)
    end = min(ta, tb)

    # Integrate in u = tau / end (the profiles are concentrated near the end for large gamma).
    def integrand(u):
        return profile(u * end, ta, ga) * profile(u * end, tb, gb) * end

    expected, _ = scipy.integrate.quad(integrand, 0, 1, epsabs=0, epsrel=1e-12, limit=200)
    got = phema.power_function_correlation(ta, sa, tb, sb)
    assert got == pytest.approx(expected, rel=1e-9)
    assert phema.power_function_correlation(tb, sb, ta, sa) == pytest.approx(got, rel=1e-12)


def test_correlation_broadcasts():
    t = np.array([[1.0], [2.0]])
    s = np.array([0.05, 0.1, 0.2])
    got = phema.power_function_correlation(t, 0.05, 1.5, s)
    assert got.shape == (2, 3)
    assert got[1, 2] == pytest.approx(phema.power_function_correlation(2.0, 0.05, 1.5, 0.2), rel=1e-14)


def test_posthoc_coefficients_columns_sum_to_one():
    in_t = np.repeat(np.arange(1, 9) * 1000.0, 2)
    in_s = np.tile([0.05, 0.10], 8)
    out_s = [0.02, 0.07, 0.15, 0.25]
    X = phema.solve_posthoc_coefficients(in_t, in_s, 8000.0, out_s)
    assert X.shape == (16, 4)
    np.testing.assert_allclose(X.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    # Asking for one of the inputs returns exactly that input.
    X = phema.solve_posthoc_coefficients(in_t, in_s, [5000.0, 8000.0], [0.10, 0.05])
    expected = np.zeros((16, 2))
    expected[9, 0] = 1.0  # (5000, 0.10)
    expected[14, 1] = 1.0  # (8000, 0.05)
    np.testing.assert_allclose(X, expected, atol=1e-8)


def test_posthoc_solution_matches_numerical_least_squares():
    # Independent slower computation: the Gram matrices of the profiles by scipy quadrature,
    # the least-squares solve, then the column normalisation.
    in_t = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    in_s = np.array([0.05, 0.1, 0.05, 0.1, 0.05, 0.1])
    out_t, out_s = np.array([3.0, 3.0, 2.0]), np.array([0.15, 0.02, 0.07])
    g_in, g_out = phema.std_to_exp(in_s), phema.std_to_exp(out_s)

    def inner(ta, ga, tb, gb):
        end = min(ta, tb)

        def f(tau):
            return profile(tau, ta, ga) * profile(tau, tb, gb)

        return scipy.integrate.quad(f, 0, end, epsabs=0, epsrel=1e-12, limit=200)[0]

    A = np.array([[inner(ti, gi, tj, gj) for tj, gj in zip(in_t, g_in)] for ti, gi in zip(in_t, g_in)])
    B = np.array([[inner(ti, gi, to, go) for to, go in zip(out_t, g_out)] for ti, gi in zip(in_t, g_in)])
    X_ref = np.linalg.solve(A, B)
    X_ref /= X_ref.sum(axis=0)
    X = phema.solve_posthoc_coefficients(in_t, in_s, out_t, out_s)
    np.testing.assert_allclose(X, X_ref, rtol=1e-6, atol=1e-8 * np.abs(X_ref).max())


def test_power_function_response():
    resp = phema.power_function_response([100, 60], [0.05, 0.2], 150, axis=1)
    assert resp.shape == (2, 150)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(resp[0, 101:] == 0) and np.all(resp[1, 61:] == 0)
    for row, ofs, std in [(0, 100, 0.05), (1, 60, 0.2)]:
        t = np.arange(1, ofs + 1)
        expected = (t / ofs) ** phema.std_to_exp(std)
        np.testing.assert_allclose(resp[row, 1 : ofs + 1], expected / expected.sum(), rtol=1e-10)
    assert phema.power_function_response(100, 0.1, 150).shape == (150,)
    assert phema.power_function_response([[100, 50]], 0.1, 150, axis=0).shape == (150, 1, 2)


def test_power_function_beta():
    for std in [0.05, 0.1]:
        g = phema.std_to_exp(std)
        assert phema.power_function_beta(std, t_next=1024, t_delta=1024) == 0.0
        assert phema.power_function_beta(std, t_next=4096, t_delta=1024) == pytest.approx(0.75 ** (g + 1), rel=1e-13)


# ----------------------------------------------------------------------------
# PowerFunctionEMA against the analytic average.


def track(num_steps, total=2**20, stds=(0.05, 0.1), ks=(0.5, 1.0, 2.0, 3.0)):
    """Run PowerFunctionEMA over a trajectory w_k(tau) = (tau / total)^k; return the EMAs."""
    net = TinyNet(len(ks)).train()
    batch = total / num_steps
    ema = phema.PowerFunctionEMA(net, stds=list(stds))
    ks = torch.tensor(ks, dtype=torch.float64)
    for step in range(1, num_steps + 1):
        cur = step * batch
        with torch.no_grad():
            net.w.copy_((cur / total) ** ks)
        ema.update(cur_nimg=cur, batch_size=batch)
    return {suffix: e.w.detach().double().numpy() for e, suffix in ema.get()}


def test_power_function_ema_matches_analytic_average():
    ks = np.array([0.5, 1.0, 2.0, 3.0])
    errors = []
    for num_steps in [10, 100, 1000]:
        emas = track(num_steps, ks=tuple(ks))
        err = 0
        for std in [0.05, 0.1]:
            g = phema.std_to_exp(std)
            # integral_0^T (tau/T)^k (g+1) tau^g dtau / T^(g+1) = (g+1) / (g+k+1)
            analytic = (g + 1) / (g + ks + 1)
            err = max(err, np.max(np.abs(emas[f"-{std:.3f}"] - analytic) / analytic))
        errors.append(err)
    # Right-endpoint rule: first-order in the step, so ~10x smaller per 10x more steps.
    assert errors[2] < 2e-3, errors
    assert errors[1] > 5 * errors[2] and errors[0] > 5 * errors[1], errors


# ----------------------------------------------------------------------------
# Tracker mechanics.


def test_power_function_ema_copies_state_and_modes():
    net = TinyNet().train()
    with torch.no_grad():
        net.w.fill_(3.0)
    net.w.grad = torch.ones(4)
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.1])
    out = ema.get()
    assert [suffix for _, suffix in out] == ["-0.050", "-0.100"]
    for e, _ in out:
        assert e is not net and not e.training and all(not m.training for m in e.modules())
        assert not e.w.requires_grad and e.w.grad is None
        assert torch.equal(e.w, net.w.detach()) and e.w.data_ptr() != net.w.data_ptr()
    # Updates leave the copies in eval mode and never touch the net.
    with torch.no_grad():
        net.w.fill_(5.0)
        net.b.fill_(7.0)
    ema.update(cur_nimg=2048, batch_size=1024)
    beta = phema.power_function_beta(0.05, 2048, 1024)
    out = ema.get()
    assert torch.allclose(out[0][0].w, torch.full((4,), beta * 3.0 + (1 - beta) * 5.0))
    assert torch.equal(out[1][0].b, net.b)  # buffers follow the net at get()
    assert not out[0][0].training and net.training
    assert torch.equal(net.w.detach(), torch.full((4,), 5.0))
    # reset() restarts from the net's current parameters and buffers.
    with torch.no_grad():
        net.w.fill_(-1.0)
        net.b.fill_(2.0)
    ema.reset()
    for e, _ in ema.get():
        assert torch.equal(e.w, net.w.detach()) and torch.equal(e.b, net.b) and not e.training


def test_power_function_ema_state_dict_roundtrip():
    net = TinyNet()
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.1])
    with torch.no_grad():
        net.w.fill_(2.0)
    ema.update(cur_nimg=4096, batch_size=1024)
    state = ema.state_dict()
    assert set(state) == {"stds", "emas"} and state["stds"] == [0.05, 0.1] and len(state["emas"]) == 2
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # checkpoints load without trusting pickles
    other = phema.PowerFunctionEMA(TinyNet(), stds=[0.05, 0.1])
    other.load_state_dict(loaded)
    for (a, sa), (b, sb) in zip(ema.get(), other.get()):
        assert sa == sb and torch.equal(a.w, b.w)


def test_ema_copies_of_mpconv_stay_fixed_in_eval():
    # MPConv overwrites its weight in training mode; the EMA copies must not drift
    # when run, even though the net they copy is in training mode.
    from training import networks_edm2

    torch.manual_seed(0)
    net = networks_edm2.MPConv(4, 6, kernel=[]).train()
    ema = phema.PowerFunctionEMA(net, stds=[0.05])
    e = ema.get()[0][0]
    before = e.weight.detach().clone()
    e(torch.randn(3, 4))
    assert torch.equal(e.weight, before)


def test_traditional_ema():
    net = TinyNet().train()
    ema = phema.TraditionalEMA(net, halflife_Mimg=0.5, rampup_ratio=0.09)
    # Ramp-up: half-life min(0.5, cur/1e6 * 0.09) Mimg.
    assert ema.beta(1_000_000, 1000) == pytest.approx(0.5 ** (1000 / 90_000), rel=1e-14)
    assert ema.beta(10_000_000, 1000) == pytest.approx(0.5 ** (1000 / 500_000), rel=1e-14)
    assert ema.beta(0, 1000) == 0.0  # floor on the denominator: the average starts at the net
    assert phema.TraditionalEMA(net, halflife_Mimg=0.5, rampup_ratio=None).beta(1000, 1000) == pytest.approx(
        0.5 ** (1000 / 500_000), rel=1e-14
    )
    assert phema.TraditionalEMA(net, rampup_ratio=None).beta(1000, 1000) == 1.0  # infinite half-life
    with torch.no_grad():
        net.w.fill_(1.0)
    ema.update(2_000_000, 1000)
    beta = 0.5 ** (1000 / 180_000)
    out = ema.get()
    assert len(out) == 1 and out[0][1] == ""
    e = out[0][0]
    assert torch.allclose(e.w, torch.full((4,), 1 - beta)) and not e.training and not e.w.requires_grad
    other = phema.TraditionalEMA(copy.deepcopy(net))
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.get()[0][0].w, e.w)
