"""Tests of the EDM sampler, guidance and per-image random generators (generate_images.py).

The reference solutions are closed forms: for data distributed as N(mu, s^2 I) the ideal
denoiser is D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), and the probability-flow
ODE moves x(sigma) - mu in proportion to sqrt(s^2 + sigma^2).
"""

import numpy as np
import pytest
import torch

import generate_images as gi

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class GaussianDenoiser:
    """Exact denoiser of N(mu, s^2 I), computed in float64 and returned in ``out_dtype``."""

    def __init__(self, mu, s, out_dtype=torch.float32, name="net", log=None):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = float(s)
        self.out_dtype = out_dtype
        self.name = name
        self.log = log if log is not None else []

    def __call__(self, x, sigma, labels=None):
        self.log.append((self.name, sigma, labels))
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        x = x.to(torch.float64)
        return ((self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)).to(self.out_dtype)


def exact_ode_solution(noise, mu, s, sigma_end=0.0):
    """x(sigma_end) of the probability-flow ODE started at x(sigma_max) = sigma_max * noise."""
    noise, mu = noise.to(torch.float64), torch.as_tensor(mu, dtype=torch.float64)
    return mu + (SIGMA_MAX * noise - mu) * np.sqrt(s**2 + sigma_end**2) / np.sqrt(s**2 + SIGMA_MAX**2)


def schedule(num_steps, rho=7):
    i = np.arange(num_steps, dtype=np.float64)
    t = (SIGMA_MAX ** (1 / rho) + i / max(num_steps - 1, 1) * (SIGMA_MIN ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho
    return np.append(t, 0)


def heun_moments(s, num_steps, S_churn=0.0, S_min=0.0, S_max=np.inf):
    """Independent float64 model of the discretised sampler for N(mu, s^2) data.

    With the exact denoiser, dx/dsigma = a(sigma) (x - mu) with a = sigma / (s^2 + sigma^2), so each
    Heun step multiplies x - mu by a scalar f and churn adds independent noise of variance
    t_hat^2 - t^2. Returns (f_total, var): the factor applied to the initial deviation, and the
    output variance per unit data variance, for initial noise of variance sigma_max^2."""
    t = schedule(num_steps)

    def a(sigma):
        return sigma / (s**2 + sigma**2)

    f_total, var = 1.0, SIGMA_MAX**2
    for i in range(num_steps):
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0
        t_hat = t[i] * (1 + gamma)
        var += t_hat**2 - t[i] ** 2
        h = t[i + 1] - t_hat
        f = 1 + h * a(t_hat)  # Euler
        if i < num_steps - 1:
            f = 1 + h / 2 * (a(t_hat) + a(t[i + 1]) * f)  # Heun
        f_total *= f
        var *= f**2
    return f_total, var / s**2


def rel_err(x, ref, mu=0.0):
    """Largest error relative to the largest deviation of the reference from the data mean."""
    x, ref, mu = x.to(torch.float64), ref.to(torch.float64), torch.as_tensor(mu, dtype=torch.float64)
    return float((x - ref).abs().max() / (ref - mu).abs().max())


def test_time_steps_match_closed_form():
    for n in (2, 5, 32):
        t = gi.edm_time_steps(n, SIGMA_MIN, SIGMA_MAX, 7).numpy()
        i = np.arange(n, dtype=np.float64)
        ref = (SIGMA_MAX ** (1 / 7) + i / (n - 1) * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7
        assert t.dtype == np.float32 and t.shape == (n + 1,)
        np.testing.assert_allclose(t[:-1], ref, rtol=1e-5)
        assert t[-1] == 0
    np.testing.assert_allclose(gi.edm_time_steps(1).numpy(), [SIGMA_MAX, 0], rtol=1e-6)  # one step starts at sigma_max


def test_sampler_solves_probability_flow_ode():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand([1, 3, 8, 8], generator=g) * 2 - 1
    s = 0.5
    noise = torch.randn([4, 3, 8, 8], generator=g)
    exact = exact_ode_solution(noise, mu, s)
    x = gi.edm_sampler(GaussianDenoiser(mu, s), noise)
    assert x.dtype == torch.float32 and x.shape == noise.shape

    # 32 steps of Heun: the discretisation error of this schedule is ~1.4% of the deviation
    # from the mean (the 1e-3 is reached at 128 steps, checked below).
    assert rel_err(x, exact, mu) < 2e-2
    # ... and it is exactly the error of Heun's method on this ODE (independent computation).
    f_total, _ = heun_moments(s, 32)
    assert rel_err(x, mu + (SIGMA_MAX * noise - mu) * f_total, mu) < 1e-5

    # Second-order convergence to the exact solution (Euler alone would be first order).
    errors = [rel_err(gi.edm_sampler(GaussianDenoiser(mu, s), noise, num_steps=n), exact, mu) for n in (32, 64, 128)]
    assert errors[2] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.6 and 3.5 < errors[1] / errors[2] < 4.6


def test_sampler_evaluates_net_at_schedule_sigmas():
    log = []
    net = GaussianDenoiser(0.0, 0.5, log=log)
    labels = torch.eye(3)[[0, 2]]
    gi.edm_sampler(net, torch.randn([2, 1, 4, 4]), labels=labels, num_steps=4)
    t = gi.edm_time_steps(4)
    expected = [t[0], t[1], t[1], t[2], t[2], t[3], t[3]]  # Euler + Heun, no correction at the last step
    assert len(log) == len(expected)
    for (_, sigma, lab), ref in zip(log, expected):
        assert torch.is_tensor(sigma) and sigma.ndim == 0 and sigma.dtype == torch.float32
        assert float(sigma) == float(ref)
        assert lab is labels


def churn_statistics(mu, s, noise, g, **kwargs):
    draws = []

    def randn_like(x):
        draws.append(x.shape)
        return torch.randn(x.shape, generator=g, dtype=x.dtype)

    x = gi.edm_sampler(GaussianDenoiser(mu, s), noise, randn_like=randn_like, **kwargs)
    z = ((x.double() - mu) / s).flatten()
    return x, float(z.mean()), float(z.var()), len(draws)


def test_churn_preserves_the_data_distribution():
    # Many independent pixels: sample mean and variance must be those of N(mu, s^2).
    g = torch.Generator().manual_seed(1)
    mu = torch.rand([1, 1, 8, 8], generator=g) - 0.5
    s = 0.5
    noise = torch.randn([512, 1, 8, 8], generator=g)  # 32768 samples: standard errors ~0.006 (mean), ~0.008 (var)

    # Fine steps, mild churn: the distribution is reproduced.
    x, mean, var, num_draws = churn_statistics(mu, s, noise, g, num_steps=128, S_churn=10, S_min=0.05, S_max=50)
    t = schedule(128)[:-1]
    assert num_draws == int(((t >= 0.05) & (t <= 50)).sum())  # one draw per churned step
    assert abs(mean) < 0.03 and abs(var - 1) < 0.04
    # Churn really changes the trajectories (the ODE alone maps noise to one fixed image).
    x_ode = gi.edm_sampler(GaussianDenoiser(mu, s), noise, num_steps=128)
    assert float((x - x_ode).abs().mean()) > 0.1 * s

    # 32 steps with the EDM churn setting (gamma clamped at sqrt(2) - 1): the variance is the one the
    # discretisation predicts (~10% above s^2), which pins down gamma, t_hat and the churn window.
    _, mean, var, _ = churn_statistics(mu, s, noise, g, S_churn=40, S_min=0.05, S_max=50)
    _, var_pred = heun_moments(s, 32, S_churn=40, S_min=0.05, S_max=50)
    assert abs(mean) < 0.03 and abs(var - var_pred) < 0.04
    assert var_pred > 1.08  # distinguishable from the no-churn variance (~1)


def test_guidance_extrapolates_denoisers():
    # Equal s: D_g + w (D - D_g) is the exact denoiser of N(mu_g + w (mu - mu_g), s^2), whose
    # ODE solution is known.
    g = torch.Generator().manual_seed(2)
    mu, mu_g = torch.rand([1, 2, 4, 4], generator=g), torch.rand([1, 2, 4, 4], generator=g) - 1
    s, w = 0.5, 2.5
    noise = torch.randn([3, 2, 4, 4], generator=g)
    mu_w = mu_g + w * (mu - mu_g)
    x = gi.edm_sampler(GaussianDenoiser(mu, s), noise, gnet=GaussianDenoiser(mu_g, s), guidance=w)
    f_total, _ = heun_moments(s, 32)
    assert rel_err(x, mu_w + (SIGMA_MAX * noise - mu_w) * f_total, mu_w) < 1e-5
    assert rel_err(x, exact_ode_solution(noise, mu_w, s), mu_w) < 2e-2

    # Different s: a single step ends at the guided denoiser's output at x0 = sigma_max * noise.
    net, gnet = GaussianDenoiser(mu, 0.5, out_dtype=torch.float16), GaussianDenoiser(mu_g, 1.3, out_dtype=torch.float16)
    x = gi.edm_sampler(net, noise, gnet=gnet, guidance=w, num_steps=1)
    x0 = SIGMA_MAX * noise
    D, D_g = net(x0, torch.tensor(SIGMA_MAX)).double(), gnet(x0, torch.tensor(SIGMA_MAX)).double()
    assert x.dtype == torch.float32  # both outputs are cast to float32 before the lerp
    assert rel_err(x, D_g + w * (D - D_g)) < 1e-5
    assert rel_err(x, D) > 0.1 and rel_err(x, D_g) > 0.1


def test_guidance_call_order_and_labels():
    log = []
    labels = torch.eye(4)[[1, 3]]
    net, gnet = GaussianDenoiser(0.2, 0.5, name="net", log=log), GaussianDenoiser(-0.2, 0.5, name="gnet", log=log)
    gi.edm_sampler(net, torch.randn([2, 1, 4, 4]), labels=labels, gnet=gnet, guidance=1.7, num_steps=3)
    assert [name for name, _, _ in log] == ["net", "gnet"] * 5  # main net first, then the guiding net
    assert all(lab is labels for _, _, lab in log)


def test_guidance_one_never_runs_guiding_net():
    def gnet(*args, **kwargs):
        raise AssertionError("guiding network evaluated with guidance 1")

    noise = torch.randn([2, 1, 4, 4])
    x = gi.edm_sampler(GaussianDenoiser(0.1, 0.5), noise, gnet=gnet, guidance=1, num_steps=4)
    ref = gi.edm_sampler(GaussianDenoiser(0.1, 0.5), noise, num_steps=4)
    assert torch.equal(x, ref)


def test_stacked_generator_rows_come_from_own_seed():
    seeds = [5, 0, 5, 2**32 + 7, 123456789]
    rnd = gi.StackedRandomGenerator("cpu", seeds)
    noise = rnd.randn([len(seeds), 2, 3, 3])
    classes = rnd.randint(10, size=[len(seeds)])
    churn = rnd.randn_like(noise)
    assert noise.shape == (5, 2, 3, 3) and classes.shape == (5,) and churn.shape == noise.shape
    for n, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed % 2**32)
        assert torch.equal(noise[n], torch.randn([2, 3, 3], generator=g))
        assert classes[n] == torch.randint(10, size=[], generator=g)
        assert torch.equal(churn[n], torch.randn([2, 3, 3], generator=g))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(noise[3], gi.StackedRandomGenerator("cpu", [7]).randn([1, 2, 3, 3])[0])  # seed % 2**32
    with pytest.raises(ValueError):
        rnd.randn([4, 2, 3, 3])
