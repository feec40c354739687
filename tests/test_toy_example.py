"""Tests of toy_example.py: the ground-truth mixture, the model, training, sampling, loading and the CLI."""

import builtins
import copy
import inspect
import io
import os
import pickle

import matplotlib.pyplot
import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

import toy_example as toy
from tests.conftest import assert_ok, assert_one_line_error
from torch_utils import persistence

CPU = torch.device("cpu")


def _double(mixture):
    """A float64 copy (gt() is cached: never convert it in place), eigendecomposed again in float64."""
    mixture = copy.deepcopy(mixture).double()
    L, Q = torch.linalg.eigh(mixture.Sigma)
    mixture._L, mixture._Q, mixture._mu_q = L, Q, torch.einsum("kj,kji->ki", mixture.mu, Q)
    return mixture


def _moments(mixture, sigma=0.0):
    """Mean and covariance of the mixture, in closed form."""
    phi, mu, Sigma = mixture.phi.double(), mixture.mu.double(), mixture.Sigma.double()
    mean = phi @ mu
    second = torch.einsum("k,kij->ij", phi, Sigma + mu[:, :, None] * mu[:, None, :])
    return mean, second - torch.outer(mean, mean) + sigma**2 * torch.eye(2, dtype=torch.float64)


# ----------------------------------------------------------------------------
# Ground truth.


def test_gt_first_branches_follow_the_recursion():
    rnd = np.random.RandomState(2)
    # Class A draws 127 lengths and 254 angles (the depth-6 branches draw them too, for children that
    # stop at depth 7 at once); then comes class B's first length.
    n = rnd.randn(382)
    origin, scale = np.array([0.0030, 0.0325]), np.array([1.3136, 1.3844])
    t = np.linspace(0.07, 0.93, 8)

    def branch(depth, pos, angle, draw):
        u = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * 0.8**depth * (1 + 0.2 * draw)
        k, s = 0.2 * 0.8**depth / length, scale * length * 0.06
        Sigma = (np.outer(u, u) + (np.eye(2) - np.outer(u, u)) * k**2) * np.outer(s, s)
        return length * 0.5**depth, (pos + u[None] * length * t[:, None]) * scale, Sigma, pos + u * length

    w0, mu0, Sigma0, end0 = branch(0, origin, np.pi / 4, n[0])  # trunk of A
    w1, mu1, Sigma1, _ = branch(1, end0, np.pi / 4 + (1 + 0.2 * n[1]), n[2])  # its first (+) child
    wb, mub, Sigmab, _ = branch(0, origin, np.pi * 5 / 4, n[381])  # trunk of B
    ab = toy.gt("AB")
    assert len(ab.phi) == 2 * 127 * 8 and len(toy.gt("A").phi) == len(toy.gt("B").phi) == 127 * 8
    np.testing.assert_allclose(ab.mu[:8].numpy(), mu0, rtol=1e-6)
    np.testing.assert_allclose(ab.mu[8:16].numpy(), mu1, rtol=1e-6)
    np.testing.assert_allclose(ab.mu[1016:1024].numpy(), mub, rtol=1e-6)
    for k, Sigma in [(0, Sigma0), (8, Sigma1), (1016, Sigmab)]:
        np.testing.assert_allclose(ab.Sigma[k].numpy(), Sigma, rtol=1e-5, atol=1e-12)
    phi = ab.phi.double().numpy()
    np.testing.assert_allclose(phi[:8], phi[0])  # equal weights along a branch
    np.testing.assert_allclose([phi[8] / phi[0], phi[1016] / phi[0]], [w1 / w0, wb / w0], rtol=1e-5)
    # Selecting classes renormalises the weights of the selection.
    np.testing.assert_allclose(toy.gt("B").phi.numpy(), phi[1016:] / phi[1016:].sum(), rtol=1e-5)
    assert abs(float(toy.gt("A").phi.double().sum()) - 1) < 1e-6


@pytest.mark.slow
def test_gt_density_integrates_to_one():
    a = toy.gt("A")
    lo, hi = a.mu.min(0).values - 0.4, a.mu.max(0).values + 0.4
    steps = 300
    xs, ys = [torch.linspace(float(lo[i]), float(hi[i]), steps) for i in range(2)]
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert abs(float(a.pdf(grid, 0.05).double().sum()) * cell - 1) < 2e-3


def test_gt_logp_and_score_against_direct_computations():
    a = _double(toy.gt("A"))
    x = torch.cat([a.sample(24, 0.03), torch.rand([8, 2], dtype=torch.float64) * 2 - 0.5])
    for sigma in [0.02, 0.3]:
        # Density: a plain sum of scipy normal densities.
        expected = sum(
            w * scipy.stats.multivariate_normal(m, S + sigma**2 * np.eye(2)).pdf(x.numpy())
            for w, m, S in zip(a.phi.numpy(), a.mu.numpy(), a.Sigma.numpy())
        )
        np.testing.assert_allclose(a.logp(x, sigma).numpy(), np.log(expected), rtol=1e-9, atol=1e-9)
        # Score: central differences of log p.
        h = 1e-6
        fd = torch.stack(
            [
                (a.logp(x + h * e, sigma) - a.logp(x - h * e, sigma)) / (2 * h)
                for e in torch.eye(2, dtype=torch.float64)
            ],
            dim=-1,
        )
        score = a.score(x, sigma)
        np.testing.assert_allclose(score.numpy(), fd.numpy(), rtol=1e-5, atol=1e-4 * float(fd.abs().max()))
        # One sigma per sample takes another code path; it must agree.
        per_sample = torch.full([len(x)], sigma, dtype=torch.float64)
        per_sample[0] = sigma * (1 + 1e-12)
        np.testing.assert_allclose(a.score(x, per_sample).numpy(), score.numpy(), rtol=1e-7, atol=1e-7)
    # float32 (the real thing) stays close to float64.
    np.testing.assert_allclose(
        toy.gt("A").score(x.float(), 0.02).numpy(),
        a.score(x, 0.02).numpy(),
        rtol=1e-3,
        atol=1e-3 * float(a.score(x, 0.02).abs().max()),
    )


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_gt_samples_have_the_mixture_moments(sigma):
    a = toy.gt("A")
    x = a.sample(200_000, sigma, generator=torch.Generator().manual_seed(0)).double()
    mean, cov = _moments(a, sigma)
    np.testing.assert_allclose(x.mean(0).numpy(), mean.numpy(), atol=4e-3)
    np.testing.assert_allclose(torch.cov(x.T).numpy(), cov.numpy(), atol=6e-3)
    # The lookup table gives every component its share of 64Ki entries (up to rounding).
    share = torch.bincount(a._sample_lut, minlength=len(a.phi)).double() / len(a._sample_lut)
    assert len(a._sample_lut) == 64 << 10 and float((share - a.phi.double()).abs().max()) <= 1.5 / len(a._sample_lut)


# ----------------------------------------------------------------------------
# The model.


def _random_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    net = toy.ToyModel(**kwargs).eval()
    with torch.no_grad():
        net.gain.fill_(0.7)
    return net


def _direct_logp(net, x, sigma):
    """log p of the model, written out from its definition."""
    xs = x / np.sqrt(net.sigma_data**2 + sigma**2)
    y = torch.cat([xs, torch.full_like(xs[:, :1], np.log(sigma) / 4), torch.ones_like(xs[:, :1])], dim=1)
    for layer in net.layers:
        if isinstance(layer, toy.MPLinear):
            w = layer.weight.detach().to(x.dtype)
            fan_in = w.shape[1]
            y = y @ (w / (1e-4 + w.norm(dim=1, keepdim=True) / np.sqrt(fan_in)) / np.sqrt(fan_in)).T
        else:
            y = torch.nn.functional.silu(y) / 0.596
    return (y**2).mean(1) * float(net.gain.detach()) / sigma - (xs**2).sum(1) / 2


def test_toy_model_layout():
    net = toy.ToyModel()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        "gain": (),
        "layers.0.weight": (64, 4),
        **{f"layers.{i}.weight": (64, 64) for i in [2, 4, 6, 8]},
    }
    assert float(net.gain.detach()) == 0
    assert all(persistence.is_persistent(c) for c in [toy.ToyModel, toy.MPLinear, toy.MPSiLU])
    assert toy.ToyModel.__module__ == "toy_example"
    assert [type(m).__name__ for m in toy.ToyModel(num_layers=2, hidden_dim=8).layers] == [
        "MPLinear",
        "MPSiLU",
        "MPLinear",
        "MPSiLU",
        "MPLinear",
    ]


def test_toy_model_logp_and_score():
    net = _random_model(num_layers=2, hidden_dim=16)
    x = torch.randn([32, 2], dtype=torch.float64)
    for sigma in [0.01, 0.4, 3.0]:
        direct = _direct_logp(net, x, sigma)  # in float64
        torch.testing.assert_close(
            net.logp(x.float(), sigma).double(), direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max())
        )
        h = 1e-6
        fd = torch.stack(
            [
                (_direct_logp(net, x + h * e, sigma) - _direct_logp(net, x - h * e, sigma)) / (2 * h)
                for e in torch.eye(2, dtype=torch.float64)
            ],
            dim=-1,
        )
        torch.testing.assert_close(
            net.score(x.float(), sigma).double(), fd, rtol=1e-4, atol=1e-4 * float(fd.abs().max())
        )
    # With gain 0 the model is the Gaussian N(0, sigma_data^2 + sigma^2): score = -x / (sigma_data^2 + sigma^2).
    with torch.no_grad():
        net.gain.zero_()
    torch.testing.assert_close(net.score(x.float(), 0.3), (-x / (0.25 + 0.09)).float())


def test_mplinear_forces_weight_normalisation():
    torch.manual_seed(0)
    layer = toy.MPLinear(5, 3)
    with torch.no_grad():
        layer.weight.mul_(7)
    raw = layer.weight.detach().clone()
    x = torch.randn(4, 5)
    expected = x @ (raw / raw.norm(dim=1, keepdim=True)).T  # unit-norm rows
    torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.weight, raw)  # eval mode leaves the stored weight alone
    torch.testing.assert_close(layer.train()(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.full([3], np.sqrt(5.0)), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------
# Sampling.


def test_sampler_on_single_gaussians():
    # For N(m, s^2 I) the probability flow ODE scales x - m by sqrt(s^2 + sigma^2); with guidance
    # the score is the lerp of two such scores, and the scale is a product of their powers.
    m = np.array([0.3, -0.2])

    def gaussian(s):
        return toy.GaussianMixture([1.0], [m], [np.eye(2) * s**2])

    x0 = torch.randn([256, 2], generator=torch.Generator().manual_seed(0)) * 5
    mt = torch.tensor(m, dtype=torch.float32)
    s1, s2, w, smax = 0.5, 0.8, 3.0, 5.0
    unguided = (s1**2 / (s1**2 + smax**2)) ** 0.5
    guided = (s1**2 / (s1**2 + smax**2)) ** (w / 2) * (s2**2 / (s2**2 + smax**2)) ** ((1 - w) / 2)
    for kwargs, scale in [
        (dict(), unguided),
        (dict(gnet=gaussian(s2), guidance=w), guided),
        (dict(gnet=gaussian(s2), guidance=1), unguided),
    ]:
        errors = []
        for steps in [32, 128]:
            x = toy.do_sample(gaussian(s1), x0, num_steps=steps, **kwargs)
            errors.append(float(((x - mt) / ((x0 - mt) * scale) - 1).abs().max()))
        assert errors[0] < 2e-2 and errors[1] < errors[0] / 3, errors  # Heun converges to the exact answer
    traj = toy.do_sample(gaussian(s1), x0, num_steps=8, return_traj=True)
    assert traj.shape == (9, 256, 2) and torch.equal(traj[0], x0)


# ----------------------------------------------------------------------------
# Training.


def test_training_step_and_ema():
    # One iteration by hand: Adam at lr 1e-2 on the exact score matching loss; the EMA then equals the net.
    torch.manual_seed(0)
    net = toy.ToyModel(num_layers=1, hidden_dim=8).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    sigma = (torch.randn(64) * 1.5 - 2.3).exp()
    x = toy.gt("A").sample(64, sigma)
    loss = (sigma**2 * ((toy.gt("A").score(x, sigma) - net.score(x, sigma, graph=True)) ** 2).mean(1)).mean()
    loss.backward()
    opt.step()
    ema = toy.do_train(num_layers=1, hidden_dim=8, batch_size=64, total_iter=1, verbose=False, device=CPU)
    assert not ema.training
    for (name, p), q in zip(net.named_parameters(), ema.parameters()):
        torch.testing.assert_close(q, p.detach(), msg=name)


@pytest.mark.slow
def test_training_reduces_the_loss(tmp_path):
    gen = torch.Generator().manual_seed(123)
    sigma = (torch.randn(2048, generator=gen) * 1.5 - 2.3).exp()
    x = toy.gt("A").sample(2048, sigma, generator=gen)
    torch.manual_seed(0)
    before = float(toy.score_matching_loss(toy.ToyModel(num_layers=2, hidden_dim=16).eval(), "A", x, sigma))
    ema = toy.do_train(
        num_layers=2,
        hidden_dim=16,
        batch_size=256,
        total_iter=96,
        verbose=False,
        device=CPU,
        pkl_pattern=str(tmp_path / "iter%04d.pkl"),
        pkl_iter=32,
    )
    after = float(toy.score_matching_loss(ema, "A", x, sigma))
    assert after < 0.7 * before, (before, after)
    assert sorted(os.listdir(tmp_path)) == ["iter0032.pkl", "iter0064.pkl", "iter0096.pkl"]
    with open(tmp_path / "iter0096.pkl", "rb") as f:
        snapshot = pickle.load(f)  # a bare model object, as the reference writes it
    assert type(snapshot).__name__ == "ToyModel" and not snapshot.training
    assert all(p.dtype == torch.float32 and p.device == CPU for p in snapshot.parameters())
    torch.testing.assert_close(snapshot.logp(x[:64], sigma[:64]), ema.logp(x[:64], sigma[:64]))


# ----------------------------------------------------------------------------
# Loading pickles in the reference's format.

# A toy module as another program would have written it: a stand-in for the reference's source,
# whose pickles carry it as module_src. Safe loading must not run it; trusted loading does.
FOREIGN_SRC = """
import builtins
import matplotlib.pyplot
import numpy as np
import torch
from torch_utils import persistence

builtins._toy_foreign_source_ran = True

@persistence.persistent_class
class MPSiLU(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.silu(x) / 0.596

@persistence.persistent_class
class MPLinear(torch.nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_dim, in_dim]))

    def forward(self, x):
        n = self.weight.shape[1]
        w = self.weight / (1e-4 + self.weight.norm(dim=1, keepdim=True) / np.sqrt(n))
        return x @ (w / np.sqrt(n)).t()

@persistence.persistent_class
class ToyModel(torch.nn.Module):
    def __init__(self, in_dim=2, num_layers=4, hidden_dim=64, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.layers = torch.nn.Sequential(MPLinear(in_dim + 2, hidden_dim))
        for _ in range(num_layers):
            self.layers.append(MPSiLU())
            self.layers.append(MPLinear(hidden_dim, hidden_dim))
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def logp(self, x, sigma=0):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        x = x / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        y = self.layers(torch.cat([x, sigma.log() / 4, torch.ones_like(sigma)], dim=-1))
        return (y ** 2).mean(-1) * self.gain / sigma.squeeze(-1) - (x ** 2).sum(-1) / 2

    def score(self, x, sigma=0, graph=False):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.logp(x, sigma).sum(), x, create_graph=graph)[0]
"""


def _metas(data: bytes) -> list:
    """The persistent-object records of a pickle, read without rebuilding anything."""
    metas = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return lambda meta: metas.append(meta) or None
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return metas


def _check_same_model(loaded, net, cls=toy.ToyModel):
    assert type(loaded) is cls
    x = torch.randn([16, 2], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.logp(x, 0.1), net.logp(x, 0.1))
    torch.testing.assert_close(loaded.score(x, 0.1), net.score(x, 0.1))


def test_reference_format_pickle_loads_safely(tmp_path):
    net = _random_model(num_layers=2, hidden_dim=16)
    data = pickle.dumps(copy.deepcopy(net).cpu())
    metas = _metas(data)
    assert [m["class_name"] for m in metas] == ["MPLinear", "MPSiLU", "MPLinear", "MPSiLU", "MPLinear", "ToyModel"]
    assert all(m["version"] == 6 and m["type"] == "class" for m in metas)
    assert metas[-1]["module_src"] == inspect.getsource(toy)
    path = tmp_path / "net.pkl"
    path.write_bytes(data)
    _check_same_model(toy.load_toy_model(str(path), device=CPU), net)
    _check_same_model(
        toy.load_toy_model(str(path), trust_embedded_code=True, device=CPU), net, cls=type(pickle.loads(data))
    )


def test_foreign_source_pickle_is_rebuilt_with_our_classes(tmp_path, monkeypatch):
    net = _random_model(num_layers=2, hidden_dim=16)
    with monkeypatch.context() as m:  # pickle it as if the foreign module had written it
        for cls in [toy.ToyModel, toy.MPLinear, toy.MPSiLU]:
            m.setattr(cls, "_orig_module_src", FOREIGN_SRC)
        data = pickle.dumps(net)
    assert {meta["module_src"] for meta in _metas(data)} == {FOREIGN_SRC}
    path = tmp_path / "foreign.pkl"
    path.write_bytes(data)
    monkeypatch.setattr(builtins, "_toy_foreign_source_ran", False, raising=False)
    safe = toy.load_toy_model(str(path), device=CPU)
    assert builtins._toy_foreign_source_ran is False  # its code did not run
    _check_same_model(safe, net)
    trusted = toy.load_toy_model(str(path), trust_embedded_code=True, device=CPU)
    assert builtins._toy_foreign_source_ran is True
    assert type(trusted).__name__ == "ToyModel" and type(trusted) is not toy.ToyModel
    x = torch.randn([16, 2])
    torch.testing.assert_close(trusted.score(x, 0.1), safe.score(x, 0.1))


def test_load_over_http(tmp_path, http_server, cache_dir):
    net = _random_model(num_layers=1, hidden_dim=8)
    http_server.routes["/toy-example/net.pkl"] = pickle.dumps(net)
    _check_same_model(toy.load_toy_model(http_server.url("/toy-example/net.pkl"), device=CPU), net)


def test_load_refuses_other_objects(tmp_path):
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a toy model"):
        toy.load_toy_model(str(tmp_path / "dict.pkl"), device=CPU)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(os.system))
    with pytest.raises(persistence.UnsafePickleError, match="system"):
        toy.load_toy_model(str(tmp_path / "evil.pkl"), device=CPU)


# ----------------------------------------------------------------------------
# Command line.


@pytest.mark.slow
def test_cli_train_then_plot(tmp_path, single_process_cli):
    for outdir, dim, iterations in [("main", 16, 4), ("guide", 8, 2)]:
        assert_ok(
            single_process_cli(
                toy.cmdline,
                "train",
                f"--outdir={tmp_path / outdir}",
                "--layers=1",
                f"--dim={dim}",
                f"--iterations={iterations}",
                "--batch=64",
                "--snap=2",
                "--viz",
            )
        )
    assert sorted(os.listdir(tmp_path / "main")) == ["iter0002.pkl", "iter0002.png", "iter0004.pkl", "iter0004.png"]
    save = tmp_path / "figures" / "toy.png"
    result = single_process_cli(
        toy.cmdline,
        "plot",
        f"--net={tmp_path / 'main/iter0004.pkl'}",
        f"--gnet={tmp_path / 'guide/iter0002.pkl'}",
        "--samples=64",
        f"--save={save}",
    )
    assert_ok(result)
    assert Image.open(save).size == (3840, 2000)  # 48 x 25 inches at 80 dpi
    assert os.listdir(save.parent) == ["toy.png"]  # written atomically, no temporary left


def test_cli_errors(tmp_path, single_process_cli, http_server, monkeypatch):
    net = tmp_path / "net.pkl"
    net.write_bytes(pickle.dumps(_random_model(num_layers=1, hidden_dim=8)))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(os.system))
    run = lambda *args: single_process_cli(toy.cmdline, *args)  # noqa: E731
    assert_one_line_error(run("train", f"--outdir={tmp_path}/x", "--cls=C"), "--cls")
    assert_one_line_error(run("train", f"--outdir={net}"), "not a folder")
    png = f"--save={tmp_path / 'out.png'}"
    assert_one_line_error(run("plot", f"--net={tmp_path}/missing.pkl", f"--gnet={net}", png), "--net", "missing.pkl")
    assert_one_line_error(
        run("plot", f"--net={net}", f"--gnet={tmp_path}/evil.pkl", png),
        "--gnet",
        "posix.system",
        "--trust-embedded-code",
    )
    assert_one_line_error(run("plot", f"--net={net}", f"--gnet={net}", f"--save={tmp_path}/out.jpg"), "--save")
    monkeypatch.setattr(matplotlib.pyplot, "get_backend", lambda: "agg")  # no display
    assert_one_line_error(run("plot", f"--net={net}", f"--gnet={net}"), "--save")
    # The published models, where they cannot be downloaded: one line that says how to train them.
    monkeypatch.setitem(toy.PUBLISHED, "--net", http_server.url("/toy-example/missing.pkl"))
    error = assert_one_line_error(run("plot", png), "cannot download", "toy_example.py train --outdir=")
    assert "--iterations=512" in error
    assert not os.path.exists(tmp_path / "out.png")
