"""Tests of toy_example.py: the closed-form mixture, the sampler, training and the two commands."""

import inspect
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from click.testing import CliRunner
from PIL import Image

import toy_example as toy
from tests.conftest import REPO_ROOT, subprocess_env

F64 = torch.float64


@pytest.fixture(scope="module")
def gmm_ab():
    return toy.toy_gmm("AB", dtype=F64)


def _probe_points(gmm, num=64, seed=0):
    """Points on the branches (samples, some slightly moved off) and around them."""
    gen = torch.Generator().manual_seed(seed)
    x, _ = gmm.sample(num, generator=gen)
    x = x + 0.02 * torch.randn(x.shape, generator=gen, dtype=F64)
    return torch.cat([x, torch.rand([num // 4, 2], generator=gen, dtype=F64) * 3 - 1.5])


# ----------------------------------------------------------------------------
# The mixture in closed form.


def test_tree_shape(gmm_ab):
    # Two classes of equal probability, each a tree of 2^7 - 1 branches of elongated components.
    for i, cls in enumerate("AB"):
        assert torch.isclose(gmm_ab.weight[gmm_ab.label == i].sum(), torch.tensor(0.5, dtype=F64))
        assert len(toy.toy_gmm(cls, dtype=F64).mu) >= 127
    std = torch.linalg.eigvalsh(gmm_ab.cov).sqrt()
    assert (std[:, 1] / std[:, 0]).min() > 2  # anisotropic: elongated along the branches
    # Both trees start at the origin and grow in opposite directions.
    mean_a = toy.toy_gmm("A", dtype=F64).mu.mean(0)
    mean_b = toy.toy_gmm("B", dtype=F64).mu.mean(0)
    assert mean_a.min() > 0.3 and mean_b.max() < -0.3


def test_logp_matches_scipy(gmm_ab):
    x = _probe_points(gmm_ab, num=16)
    for sigma in [0.0, 0.1]:
        expected = np.zeros(len(x))
        for mu, cov, w in zip(gmm_ab.mu.numpy(), gmm_ab.cov.numpy(), gmm_ab.weight.numpy()):
            expected += w * scipy.stats.multivariate_normal(mu, cov + sigma ** 2 * np.eye(2)).pdf(x.numpy())
        got = toy.gmm_logp(x, gmm_ab.mu, gmm_ab.cov, gmm_ab.weight, sigma).numpy()
        np.testing.assert_allclose(got, np.log(expected), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("classes", ["A", "B"])
def test_density_integrates_to_one(classes):
    gmm = toy.toy_gmm(classes, dtype=F64)
    std = torch.linalg.eigvalsh(gmm.cov).sqrt()  # [K, 2], ascending
    lo = (gmm.mu - 6 * std[:, 1:]).min(0).values.numpy()  # every component to 6 std (all but ~1e-8 of it)
    hi = (gmm.mu + 6 * std[:, 1:]).max(0).values.numpy()
    # A Riemann sum of a Gaussian on a grid of spacing h is exact up to ~exp(-2 pi^2 std^2 / h^2).
    h = 1.4 * std.min().item()
    xs, ys = [np.arange(a, b, h) for a, b in zip(lo, hi)]
    grid = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2))
    total = gmm.logp(grid).exp().sum().item() * h * h
    assert abs(total - 1) < 1e-3
    # The sigma-smoothed density too, on a coarser grid.
    h = 0.05
    xs, ys = [np.arange(a - 1, b + 1, h) for a, b in zip(lo, hi)]
    grid = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2))
    total = gmm.logp(grid, sigma=0.1).exp().sum().item() * h * h
    assert abs(total - 1) < 1e-3


@pytest.mark.parametrize("sigma", [0.0, 0.03, 0.3])
def test_score_matches_finite_differences(gmm_ab, sigma):
    x = _probe_points(gmm_ab)
    eps = 1e-6
    fd = torch.stack([(gmm_ab.logp(x + eps * e, sigma) - gmm_ab.logp(x - eps * e, sigma)) / (2 * eps)
                      for e in torch.eye(2, dtype=F64)], dim=1)
    score = toy.gmm_score(x, gmm_ab.mu, gmm_ab.cov, gmm_ab.weight, sigma)
    err = (score - fd).norm(dim=1) / (1 + fd.norm(dim=1))
    assert err.max() < 1e-5
    # Per-sample sigmas give the same as one sigma at a time.
    sigmas = torch.full([len(x)], float(sigma), dtype=F64)
    torch.testing.assert_close(gmm_ab.score(x, sigmas), score)


def test_denoiser_is_posterior_mean(gmm_ab):
    # D(x; sigma) = E[y | y + sigma n = x], estimated by self-normalised importance weights over samples y ~ p.
    sigma = 0.3
    gen = torch.Generator().manual_seed(1)
    y, _ = gmm_ab.sample(100000, generator=gen)
    x = _probe_points(gmm_ab, num=8, seed=2)
    logw = -((x[:, None, :] - y[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    expected = (torch.softmax(logw, dim=1)[..., None] * y[None]).sum(1)
    torch.testing.assert_close(toy.gmm_denoiser(x, sigma, gmm_ab.mu, gmm_ab.cov, gmm_ab.weight), expected,
                               atol=0.01, rtol=0)


def test_select_and_widen(gmm_ab):
    x = _probe_points(gmm_ab)
    p_union = gmm_ab.logp(x).exp()
    p_classes = [toy.toy_gmm(c, dtype=F64).logp(x).exp() for c in "AB"]
    torch.testing.assert_close(p_union, 0.5 * p_classes[0] + 0.5 * p_classes[1])
    torch.testing.assert_close(gmm_ab.widen(0.2).logp(x), gmm_ab.logp(x, sigma=0.2))


# ----------------------------------------------------------------------------
# Sampling.


def test_sampler_on_a_gaussian():
    # For data N(0, s^2 I) the probability-flow ODE scales x by sqrt(s^2 + sigma^2). Heun's method must follow
    # it closely and with second-order convergence.
    s, sigma_min, sigma_max = 0.5, 0.002, 5.0
    denoise = lambda x, t: x * s ** 2 / (s ** 2 + t ** 2)
    noise = torch.randn([100, 2], dtype=F64, generator=torch.Generator().manual_seed(0))
    at_sigma_min = noise * sigma_max * np.sqrt((s ** 2 + sigma_min ** 2) / (s ** 2 + sigma_max ** 2))
    expected = denoise(at_sigma_min, sigma_min)  # the last step jumps to D(x; sigma_min)
    errors = []
    for num_steps in [32, 64]:
        x = toy.edm_sampler(denoise, noise, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
        errors.append(((x - expected).abs() / expected.abs()).max().item())
    assert errors[0] < 0.01
    assert 0.2 < errors[1] / errors[0] < 0.3


@pytest.fixture(scope="module")
def class_a():
    gmm = toy.toy_gmm("A", dtype=F64)
    noise = torch.randn([1000, 2], dtype=F64, generator=torch.Generator().manual_seed(0))
    unguided = toy.edm_sampler(gmm.denoise, noise, num_steps=20)
    true, _ = gmm.sample(20000, generator=torch.Generator().manual_seed(1))
    return gmm, noise, unguided, true


def test_exact_sampling_reproduces_mixture(class_a):
    gmm, _, x, true = class_a
    n = len(x)
    torch.testing.assert_close(x.mean(0), true.mean(0), atol=4 * true.std(0).max().item() / np.sqrt(n), rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.cov(true.T), atol=0.03, rtol=0)
    logp_x, logp_true = gmm.logp(x), gmm.logp(true)
    assert abs(logp_x.mean() - logp_true.mean()) < 4 * logp_true.std() / np.sqrt(n)
    # As many samples as expected fall outside the region holding 99% of the mass.
    assert (logp_x < torch.quantile(logp_true, 0.01)).double().mean() < 0.03


def test_guidance_concentrates_on_high_density(class_a):
    gmm, noise, unguided, _ = class_a
    # Autoguidance with the exact denoiser and a widened ("worse") version of it as the guide.
    auto = toy.edm_sampler(gmm.denoise, noise, guide=gmm.widen(0.05).denoise, guidance=3, num_steps=20)
    assert gmm.logp(auto).mean() > gmm.logp(unguided).mean() + 0.3
    # Classifier-free guidance (guide = the union) pushes samples away from class B: the classifier's
    # log-likelihood ratio log p(x | A) - log p(x | B) grows.
    gmm_b = toy.toy_gmm("B", dtype=F64)
    cfg = toy.edm_sampler(gmm.denoise, noise, guide=toy.toy_gmm("AB", dtype=F64).denoise, guidance=3, num_steps=20)
    ratio = lambda x: (gmm.logp(x) - gmm_b.logp(x)).clamp(max=50).mean()
    assert ratio(cfg) > ratio(unguided) + 1


# ----------------------------------------------------------------------------
# Network, EMA and training.


def test_toynet_preconditioning():
    torch.manual_seed(0)
    net = toy.ToyNet(num_layers=2, hidden_dim=16, label_dim=2)
    x = torch.randn([5, 2])
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 4.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(net(x, sigma), c_skip[:, None] * x)  # out_gain starts at 0
    with torch.no_grad():
        net.out_gain.fill_(1)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 0]), 2)
    D, logvar = net(x, sigma, onehot, return_logvar=True)
    assert D.shape == (5, 2) and logvar.shape == (5, 1)
    assert not torch.allclose(D, net(x, sigma))  # the class matters


def test_power_ema_rule():
    std = 0.010
    gamma = toy._std_to_exp(std)
    assert abs(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) - std) < 1e-9  # spec's exp_to_std
    net = torch.nn.Linear(1, 1, bias=False)
    ema = toy._PowerEMA(net, stds=[std])
    expected = None
    for t in range(1, 20):
        with torch.no_grad():
            net.weight.fill_(float(t) ** 0.5)
        ema.update(cur_nimg=t, batch_size=1)
        beta = (1 - 1 / t) ** (gamma + 1)
        expected = net.weight.item() if expected is None else beta * expected + (1 - beta) * net.weight.item()
    assert abs(ema.get()[0][0].weight.item() - expected) < 1e-6


def test_learning_rate_schedule():
    assert toy.toy_learning_rate(0) == 1e-2 and toy.toy_learning_rate(512) == 1e-2
    assert abs(toy.toy_learning_rate(2048) - 1e-2 / 2) < 1e-12


def test_reference_defaults():
    # Spec section 14: 4096 iterations of batch 4096, P_mean -2.3, P_std 1.5, lr 1e-2 / sqrt(max(it / 512, 1)),
    # EMA sigma_rel 0.010, snapshots every 256 iterations; plot guidance 3.
    defaults = {p.name: p.default for p in toy.train.params}
    assert (defaults["total_iter"], defaults["batch_size"], defaults["snapshot_iter"]) == (4096, 4096, 256)
    sig = inspect.signature(toy.train_toy).parameters
    assert (sig["P_mean"].default, sig["P_std"].default, sig["ref_lr"].default) == (-2.3, 1.5, 1e-2)
    assert (sig["ref_iter"].default, sig["ema_std"].default) == (512, 0.010)
    assert {p.name: p.default for p in toy.plot.params}["guidance"] == 3


def test_trusted_loading(tmp_path):
    path = tmp_path / "seq.pkl"
    path.write_bytes(pickle.dumps(torch.nn.Sequential(torch.nn.Linear(2, 2))))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load torch.nn.modules.container.Sequential"):
        toy.load_toy_net(str(path), device="cpu")
    assert isinstance(toy.load_toy_net(str(path), trust_embedded_code=True, device="cpu"), torch.nn.Sequential)


def test_train_writes_snapshots(tmp_path):
    net = toy.train_toy(outdir=str(tmp_path), classes="A", num_layers=2, hidden_dim=16, total_iter=10,
                        batch_size=64, snapshot_iter=4, viz=True, device="cpu", verbose=False)
    assert sorted(os.listdir(tmp_path)) == [f"iter{i:04d}.{ext}" for i in (4, 8, 10) for ext in ("pkl", "png")]
    with Image.open(tmp_path / "iter0010.png") as image:
        assert image.format == "PNG"
    loaded = toy.load_toy_net(str(tmp_path / "iter0010.pkl"), device="cpu")
    assert type(loaded) is toy.ToyNet and not loaded.training and loaded.classes == "A"
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.parameters())
    x = torch.randn([8, 2])
    torch.testing.assert_close(loaded(x, 0.5), net(x, 0.5))


def test_training_learns_the_denoiser():
    gmm = toy.toy_gmm("A")
    y, _ = gmm.sample(2048, generator=torch.Generator().manual_seed(5))
    sigma = 0.2
    x = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    ideal = gmm.denoise(x, sigma)

    def error(net):
        with torch.no_grad():
            return ((net(x, sigma) - ideal) ** 2).sum(1).mean().item()

    torch.manual_seed(0)
    untrained = toy.ToyNet(num_layers=2, hidden_dim=32)
    trained = toy.train_toy(classes="A", num_layers=2, hidden_dim=32, total_iter=150, batch_size=256,
                            ema_std=0.05, device="cpu", verbose=False)
    assert error(trained) < 0.5 * error(untrained)


# ----------------------------------------------------------------------------
# Command line.


def test_cli_train_then_plot(tmp_path):
    """The script as users run it: its snapshots pickle as toy_example.ToyNet (not __main__) and load here."""
    r = subprocess.run([sys.executable, str(REPO_ROOT / "toy_example.py"), "train", "--outdir=run", "--cls=AB", "--cond",
                        "--layers=2", "--dim=8", "--iters=4", "--batch=32", "--snap=2", "--device=cpu"],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["iter0002.pkl", "iter0004.pkl"]
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(tmp_path / "run" / "iter0004.pkl", "rb") as f:
        assert isinstance(Recorder(f).load(), toy.ToyNet)
    assert ("toy_example", "ToyNet") in seen and not any(m == "__main__" for m, _ in seen)
    # A conditional net is its own unconditional guide for CFG.
    out = tmp_path / "out.png"
    r = CliRunner().invoke(toy.cli, ["plot", f"--net={tmp_path}/run/iter0004.pkl", f"--gnet={tmp_path}/run/iter0002.pkl",
                                     "--samples=50", "--steps=4", "--size=64", f"--save={out}", "--device=cpu"])
    assert r.exit_code == 0, r.output
    assert "Autoguidance" in r.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 4 * 64


def test_plot_exact(tmp_path):
    out = tmp_path / "out.png"
    r = CliRunner().invoke(toy.cli, ["plot", "--exact", "--samples=300", "--steps=12", "--size=96", f"--save={out}",
                                     "--device=cpu"])
    assert r.exit_code == 0, r.output
    for name in ["Unguided", "Classifier-free guidance", "Autoguidance"]:
        assert re.search(name + r" +mean log p\(x\) +-?\d+\.\d+ +outside 99% region +\d+\.\d%", r.output)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape[1] > 4 * 96
    assert (image[..., 0] - image[..., 2] > 40).mean() > 0.05  # the orange density is drawn
    assert not [f for f in os.listdir(tmp_path) if f != "out.png"]  # no temporary file left


def test_render_panel_draws_samples_where_they_are():
    size, extent = 64, (-1.0, 1.0, -1.0, 1.0)
    logp = toy.toy_gmm("A", dtype=F64).logp(toy._grid(size, extent)).numpy()
    samples = np.array([[-0.5, 0.5], [0.5, -0.5]])
    with_dots = np.asarray(toy.render_panel(logp, None, samples, "t", size=size, extent=extent)).astype(int)
    without = np.asarray(toy.render_panel(logp, None, None, "t", size=size, extent=extent)).astype(int)
    bar = with_dots.shape[0] - size
    # Row/column of each sample: x to the right, y up.
    for (px, py) in [(16, 16), (48, 48)]:
        assert with_dots[bar + py, px].sum() < without[bar + py, px].sum() - 150
    assert abs(with_dots[bar + 16, 48].sum() - without[bar + 16, 48].sum()) < 5  # nothing drawn elsewhere


def _one_line_error(result, exit_code=None):
    assert result.exit_code != 0
    if exit_code is not None:
        assert result.exit_code == exit_code
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1
    return errors[0]


def test_bad_input(tmp_path):
    runner = CliRunner()
    assert "is not one of A, B, AB" in _one_line_error(
        runner.invoke(toy.cli, ["train", f"--outdir={tmp_path}", "--cls=C"]), 2)
    assert "no such file" in _one_line_error(
        runner.invoke(toy.cli, ["plot", "--net=missing.pkl", "--gnet=missing.pkl", f"--save={tmp_path / 'a.png'}"]))
    assert "--gnet" in _one_line_error(runner.invoke(toy.cli, ["plot", "--net=x.pkl"]))
    assert ".png" in _one_line_error(runner.invoke(toy.cli, ["plot", "--exact", "--save=out.jpg"]))
    # A pickle that would run code when loaded is refused, in one line.
    evil = tmp_path / "evil.pkl"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil.write_bytes(pickle.dumps(Evil()))
    msg = _one_line_error(runner.invoke(toy.cli, ["plot", f"--net={evil}", f"--gnet={evil}",
                                                  f"--save={tmp_path / 'a.png'}"]))
    assert "refusing" in msg and "system" in msg
    assert not (tmp_path / "a.png").exists()
