"""Tests of the samplers (heun, euler, dpmpp-2m), the guidance interval and the evaluation counts.

Closed forms: for data N(mu, s^2 I) the ideal denoiser is D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 +
sigma^2) and the probability-flow ODE moves x(sigma) - mu in proportion to sqrt(s^2 + sigma^2). Every
sampler ends with x_N = D(x_{N-1}; sigma_min), so D of the exact x(sigma_min) is the exact output, and
the error measures the discretisation of the ODE alone.
"""

import numpy as np
import pytest
import torch

import generate_images as gi
from tests.conftest import assert_one_line_error
from tests.test_generate_images import make_net, nets, run_cli  # noqa: F401 -- fixtures
from tests.test_sampler import SIGMA_MAX, SIGMA_MIN, GaussianDenoiser, exact_ode_solution, rel_err, schedule
from training import sampling
from training.encoders import StandardRGBEncoder

SAMPLERS = list(sampling.SAMPLERS)


def gaussian_problem(seed=0, s=0.5):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand([1, 3, 8, 8], generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn([4, 3, 8, 8], generator=g, dtype=torch.float64)
    x_min = exact_ode_solution(noise, mu, s, sigma_end=SIGMA_MIN)
    exact = GaussianDenoiser(mu, s, out_dtype=torch.float64)(x_min, torch.tensor(SIGMA_MIN))
    return mu, s, noise, exact


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp-2m", 2)])
def test_convergence_order(name, order):
    mu, s, noise, exact = gaussian_problem()
    sampler = sampling.SAMPLERS[name]
    # 16, 32, 64, 128 intervals: each run halves every step of the previous one (nested schedules).
    errors = [
        rel_err(sampler(GaussianDenoiser(mu, s, torch.float64), noise, num_steps=n, dtype=torch.float64), exact, mu)
        for n in (17, 33, 65, 129)
    ]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(0.9 * 2**order < r < 1.15 * 2**order for r in ratios), (errors, ratios)
    assert errors[-1] < (3e-2 if order == 1 else 1.5e-3)


def reference_dpmpp_2m(denoise, x, t):
    """DPM-Solver++(2M) written out in lambda = -log(sigma) as Lu et al. state it, float64."""
    lam = -np.log(t[:-1])
    D_prev = None
    for i in range(len(t) - 1):
        D = denoise(x, t[i])
        if t[i + 1] == 0:
            return D
        h = lam[i + 1] - lam[i] if i + 1 < len(lam) else None
        if D_prev is None:
            D_hat = D
        else:
            r = (lam[i] - lam[i - 1]) / h
            D_hat = (1 + 1 / (2 * r)) * D - 1 / (2 * r) * D_prev
        x = np.exp(-h) * x + (1 - np.exp(-h)) * D_hat  # sigma_{i+1}/sigma_i = e^{-h}
        D_prev = D
    return x


def test_dpmpp_2m_matches_the_published_update():
    mu, s, noise, _ = gaussian_problem(seed=1)
    net = GaussianDenoiser(mu, s, torch.float64)
    t = schedule(7)
    ref = reference_dpmpp_2m(lambda x, sigma: net(x, torch.tensor(sigma)), SIGMA_MAX * noise, t)
    x = sampling.dpmpp_2m_sampler(net, noise, num_steps=7, dtype=torch.float64)
    assert rel_err(x, ref, mu) < 1e-10
    # Its first (first-order) step is Euler's step: with two steps both samplers agree.
    x2 = sampling.dpmpp_2m_sampler(net, noise, num_steps=2, dtype=torch.float64)
    assert rel_err(x2, sampling.euler_sampler(net, noise, num_steps=2, dtype=torch.float64), mu) < 1e-10


def old_edm_sampler(
    net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1,
    S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32, randn_like=torch.randn_like,
):  # fmt: skip
    """edm_sampler as it was before the guidance interval (kept verbatim as the reference)."""

    def denoise(x, t):
        Dx = net(x, t, labels).to(dtype)
        if guidance == 1 or gnet is None or gnet is net:
            return Dx
        ref_Dx = gnet(x, t, labels).to(dtype)
        return ref_Dx.lerp(Dx, guidance)

    t_steps = gi.edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        if gamma > 0:
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat = t_cur
            x_hat = x_cur
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_heun_without_interval_is_bit_identical_to_before():
    net, gnet = make_net(label_dim=4, seed=1), make_net(label_dim=4, seed=2)
    noise, labels = torch.randn([3, 3, 8, 8]), torch.eye(4)[[0, 3, 1]]
    for kwargs in [dict(), dict(gnet=gnet, guidance=2.3), dict(gnet=gnet, guidance=1.7, S_churn=20, S_max=30)]:
        results = []
        for sampler in (old_edm_sampler, gi.edm_sampler):
            rnd = gi.StackedRandomGenerator("cpu", [5, 6, 7])
            with torch.no_grad():
                results.append(sampler(net, noise, labels, num_steps=5, randn_like=rnd.randn_like, **kwargs))
        assert torch.equal(*results), kwargs


def guided_call_sigmas(name, num_steps, interval, guidance=2.0):
    log = []
    net, gnet = GaussianDenoiser(0.2, 0.5, name="net", log=log), GaussianDenoiser(-0.2, 0.5, name="gnet", log=log)
    sampling.SAMPLERS[name](
        net, torch.randn([2, 1, 4, 4]), gnet=gnet, guidance=guidance, num_steps=num_steps, guidance_interval=interval
    )
    return [(who, float(sigma)) for who, sigma, _ in log]


@pytest.mark.parametrize("name", SAMPLERS)
def test_guidance_interval_runs_the_guiding_net_on_exactly_the_steps_inside(name):
    t = [float(v) for v in gi.edm_time_steps(8)]
    lo, hi = t[5], t[2]  # inclusive: steps 2..5 exactly at the bounds
    calls = guided_call_sigmas(name, 8, (lo, hi))
    # Step i evaluates the main net at t_i (and, for heun except the last step, at t_{i+1}).
    per_step = [[t[i], t[i + 1]] if name == "heun" and i < 7 else [t[i]] for i in range(8)]
    expected = []
    for i, sigmas in enumerate(per_step):
        for sigma in sigmas:
            expected += [("net", sigma)] + ([("gnet", sigma)] if 2 <= i <= 5 else [])
    assert calls == expected
    nfe = sampling.count_evaluations(name, num_steps=8, guidance=2.0, guidance_interval=(lo, hi))
    assert nfe == dict(net=sum(map(len, per_step)), gnet=sum(len(per_step[i]) for i in range(2, 6)))
    # No interval: every evaluation guided; an interval between two steps: none.
    assert [who for who, _ in guided_call_sigmas(name, 8, None)] == ["net", "gnet"] * len(expected_net(per_step))
    assert {who for who, _ in guided_call_sigmas(name, 8, (t[3] * 0.99, t[3] * 0.995))} == {"net"}


def expected_net(per_step):
    return [sigma for sigmas in per_step for sigma in sigmas]


@pytest.mark.parametrize("name", SAMPLERS)
def test_guidance_interval_switches_the_denoiser(name):
    # Inside the interval D = D_g + w (D - D_g); outside D alone. An interval that covers every step
    # gives the fully guided result, an interval that covers none the unguided one.
    mu, s, noise, _ = gaussian_problem(seed=3)
    net, gnet = GaussianDenoiser(mu, s, torch.float64), GaussianDenoiser(-mu, 0.8, torch.float64)
    sampler = sampling.SAMPLERS[name]

    def run(**kwargs):
        return sampler(net, noise, gnet=gnet, num_steps=6, dtype=torch.float64, **kwargs)

    guided, unguided = run(guidance=2.5), run(guidance=1)
    assert torch.equal(run(guidance=2.5, guidance_interval=(0, SIGMA_MAX)), guided)
    assert torch.equal(run(guidance=2.5, guidance_interval=(100, 200)), unguided)
    partial = run(guidance=2.5, guidance_interval=(1, 10))
    assert rel_err(partial, guided) > 1e-3 and rel_err(partial, unguided) > 1e-3


def test_evaluation_counts():
    for n in (1, 2, 32):
        assert sampling.count_evaluations("heun", num_steps=n) == dict(net=2 * n - 1, gnet=0)
        assert sampling.count_evaluations("euler", num_steps=n, guidance=3) == dict(net=n, gnet=n)
        assert sampling.count_evaluations("dpmpp-2m", num_steps=n, guidance=3, guided=False) == dict(net=n, gnet=0)
    assert sampling.count_evaluations("heun", guidance=1) == dict(net=63, gnet=0)  # guidance 1: never guided
    assert "63 network evaluations per image (+ 12 of the guiding network)" in sampling.describe_nfe(
        "heun", sampling.count_evaluations("heun", guidance=2, guidance_interval=(0.28, 1.61))
    )


@pytest.mark.parametrize("key", list(gi.paper_guidance_intervals))
def test_paper_intervals_select_the_papers_steps(key):
    setting = gi.paper_guidance_intervals[key]
    lo, hi = setting["interval"]
    t = gi.edm_time_steps(32)[:-1]
    inside = [i for i, sigma in enumerate(t) if lo <= sigma <= hi]
    assert inside == list(range(setting["steps"][0], setting["steps"][1] + 1))
    assert f"--guidance={setting['guidance']} --guidance-interval={lo:g},{hi:g}" in gi._PRESETS_HELP


def test_churn_is_refused_by_samplers_without_churn():
    net = GaussianDenoiser(0.0, 0.5)
    for name in ("euler", "dpmpp-2m"):
        with pytest.raises(ValueError, match="no churn"):
            sampling.SAMPLERS[name](net, torch.randn([1, 1, 2, 2]), S_churn=1)
        with pytest.raises(ValueError, match="no churn"):  # before anything is loaded
            gi.generate_images("missing.pkl", sampler_fn=name, S_churn=1, verbose=False, device="cpu")


def test_parse_guidance_interval():
    assert gi.parse_guidance_interval("0.28, 1.61") == (0.28, 1.61)
    assert gi.parse_guidance_interval("2,2") == (2.0, 2.0)
    assert gi.parse_guidance_interval((1, 3)) == (1.0, 3.0) and gi.parse_guidance_interval(None) is None
    for bad in ("1.61,0.28", "a,b", "1", "1,2,3", "-1,2", ""):
        with pytest.raises(ValueError):
            gi.parse_guidance_interval(bad)


@pytest.mark.parametrize("name", SAMPLERS)
def test_generate_images_per_seed_whatever_the_batch(name):
    net, gnet = make_net(label_dim=4, seed=1), make_net(label_dim=4, seed=2)
    kwargs = dict(gnet=gnet, guidance=2.0, guidance_interval=(1, 20), num_steps=4, sampler_fn=name)

    def run(batch):
        batches = gi.generate_images(net, seeds=[3, 4, 5], max_batch_size=batch, verbose=False, device="cpu", **kwargs)
        assert batches.nfe == sampling.count_evaluations(name, num_steps=4, guidance=2.0, guidance_interval=(1, 20))
        results = list(batches)
        assert all(r.nfe == batches.nfe for r in results)
        return torch.cat([r.images for r in results]), torch.cat([r.noise for r in results])

    images, noise = run(3)
    assert torch.equal(run(1)[0], images)
    # The images are the sampler's output on the seeds' noise and classes (here all drawn at random).
    rnd = gi.StackedRandomGenerator("cpu", [3, 4, 5])
    rnd.randn(noise.shape)
    labels = torch.eye(4)[rnd.randint(4, size=[3])]
    with torch.no_grad():
        x = sampling.SAMPLERS[name](net, noise, labels, gnet=gnet, guidance=2.0, guidance_interval=(1, 20), num_steps=4)
    assert torch.equal(StandardRGBEncoder().decode(x), images)


def test_generate_images_prints_the_evaluations(capsys):
    net = make_net(label_dim=0, seed=1)
    list(gi.generate_images(net, gnet=make_net(seed=2), guidance=2, guidance_interval=(0.28, 1.61), seeds=[1], num_steps=32, sampler_fn="dpmpp-2m", device="cpu", distributed=False))  # fmt: skip
    assert "dpmpp-2m: 32 network evaluations per image (+ 6 of the guiding network)" in capsys.readouterr().out


def test_cli_errors(run_cli, tmp_path, nets):  # noqa: F811 -- the imported fixtures
    base = ["--net", nets.uncond, "--outdir", tmp_path / "out", "--steps", 2, "--seeds", 1]
    assert_one_line_error(run_cli(*base, "--guidance-interval", "2,1"), "LO <= HI")
    assert_one_line_error(run_cli(*base, "--guidance-interval", "x,1"), "two noise levels")
    assert_one_line_error(run_cli(*base, "--sampler", "euler", "--S_churn", 1), "no churn")
