"""Tests for reconstruct_phema.py.

The snapshots are tiny EDM2 networks (``training.networks_edm2.Precond``) whose parameters are
set by hand to the *analytic* power-function EMA of a known training trajectory, so the right
answer for any other EMA length is known in closed form. Expected reconstructions are
computed here from the EDM2 paper's formulas, independently of training/phema.py.
"""

import copy
import functools
import io
import os
import pickle
import re
import subprocess
import sys

import click.testing
import numpy as np
import pytest
import torch

import dnnlib
import reconstruct_phema
from tests.conftest import REPO_ROOT, subprocess_env
from training import encoders, networks_edm2, training_loop

T = 64 * 1024  # Final training time (images): snapshot times are multiples of 1024.
KS = np.array([0.5, 1.0, 2.0, 3.0, 6.0])  # Trajectory exponents: w_e(tau) = a_e (tau / T)^k_e.

# ----------------------------------------------------------------------------
# Independent reference math (the paper's Appendix C.2), written without training/phema.py.


def std_to_exp(std):
    """Largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2), by bisection on g >= 0."""
    std = float(std)

    def f(g):
        return (g + 1) / ((g + 2) ** 2 * (g + 3)) - std**2  # decreasing in g >= 0

    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def inner(ta, ga, tb, gb):
    """<p_a, p_b> by the closed form, times in units of T."""
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * min(ta, tb) ** (ga + gb + 1) / (ta ** (ga + 1) * tb ** (gb + 1))


def reference_coefficients(in_times, in_stds, out_time, out_stds):
    """X = A^-1 B with normalised columns, plus the L2 norm of each output's fit residual."""
    tin = np.asarray(in_times, np.float64) / T
    gin = [std_to_exp(s) for s in in_stds]
    gout = [std_to_exp(s) for s in out_stds]
    to = out_time / T
    A = np.array([[inner(ta, ga, tb, gb) for tb, gb in zip(tin, gin)] for ta, ga in zip(tin, gin)])
    B = np.array([[inner(ta, ga, to, go) for go in gout] for ta, ga in zip(tin, gin)])
    X = np.linalg.solve(A, B)
    X /= X.sum(axis=0)
    C = np.array([inner(to, go, to, go) for go in gout])
    resid = np.sqrt(np.maximum(np.einsum("io,ij,jo->o", X, A, X) - 2 * np.einsum("io,io->o", X, B) + C, 0))
    return X, resid


def analytic_ema(t, std, amp, ks):
    """Power-function EMA at time t of w(tau) = amp * (tau / T)^k: amp (g+1)/(g+k+1) (t/T)^k."""
    g = std_to_exp(std)
    return amp * (g + 1) / (g + ks + 1) * (t / T) ** ks


# ----------------------------------------------------------------------------
# Snapshot pickles.


def make_net():
    torch.manual_seed(0)
    return (
        networks_edm2.Precond(
            img_resolution=8,
            img_channels=3,
            label_dim=0,
            model_channels=8,
            channel_mult=[1],
            num_blocks=1,
            attn_resolutions=[],
        )
        .eval()
        .requires_grad_(False)
    )


NET = make_net().float()
NUMEL = sum(p.numel() for p in NET.parameters())
# Every parameter element follows one trajectory: exponent and amplitude by element index.
ELEM_K = KS[np.arange(NUMEL) % len(KS)]
ELEM_AMP = np.random.RandomState(1).uniform(0.5, 2.0, NUMEL) * np.where(np.arange(NUMEL) % 2, 1, -1)


def set_flat_params(net, values):
    with torch.no_grad():
        ofs = 0
        for p in net.parameters():
            p.copy_(torch.as_tensor(values[ofs : ofs + p.numel()]).reshape(p.shape))
            ofs += p.numel()


def flat_params(net):
    return torch.cat([p.detach().double().flatten() for p in net.parameters()]).numpy()


def snapshot_dict(net, dtype=torch.float16):
    return dnnlib.EasyDict(
        encoder=encoders.StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="data", use_labels=False),
        loss_fn=training_loop.EDM2Loss(),
        ema=net.to(dtype).eval().requires_grad_(False),
    )


def write_snapshot(folder, nimg, std, prefix="network-snapshot", dtype=torch.float16):
    """A snapshot holding the exact analytic EMA with sigma_rel ``std`` at time ``nimg``."""
    net = copy.deepcopy(NET)
    set_flat_params(net, analytic_ema(nimg, std, ELEM_AMP, ELEM_K))
    with torch.no_grad():  # A buffer that differs per snapshot, to see which input buffers come from.
        net.unet.emb_fourier.freqs.fill_(nimg / T)
    path = os.path.join(folder, f"{prefix}-{nimg // 1000:07d}-{std:.3f}.pkl")
    with open(path, "wb") as f:
        pickle.dump(snapshot_dict(net, dtype), f)
    return path


@functools.cache
def stored_input(path):
    """What an input actually holds (e.g. float16-rounded values), as a float64 vector."""
    with open(path, "rb") as f:
        return flat_params(pickle.load(f)["ema"])


def stored_inputs(paths):
    return np.stack([stored_input(path) for path in paths])


def write_snapshots(folder, interval, dtype):
    """Snapshots every ``interval`` images up to T with sigma_rel 0.050 and 0.100, and at time 0."""
    paths = {}
    for nimg in range(0, T + 1, interval):
        for std in (0.05, 0.1):
            paths[(nimg, std)] = write_snapshot(str(folder), nimg, std, dtype=dtype)
    return dnnlib.EasyDict(folder=str(folder), paths=paths)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Realistic float16 snapshots every T/8 images."""
    return write_snapshots(tmp_path_factory.mktemp("snapshots"), T // 8, torch.float16)


@pytest.fixture(scope="module")
def snapshots32(tmp_path_factory):
    """Float32 snapshots every T/32 images, to see the reconstruction's own error."""
    return write_snapshots(tmp_path_factory.mktemp("snapshots32"), T // 32, torch.float32)


class OpenCounter:
    """Wraps ``dnnlib.util.open_url`` (through which the inputs are read) to count how often each
    input file is opened."""

    def __init__(self, monkeypatch):
        self.counts = {}
        self.open_url = dnnlib.util.open_url
        monkeypatch.setattr(dnnlib.util, "open_url", self)

    def __call__(self, path, *args, **kwargs):
        self.counts[os.path.basename(path)] = self.counts.get(os.path.basename(path), 0) + 1
        return self.open_url(path, *args, **kwargs)


def run_cli(*args):
    return click.testing.CliRunner().invoke(reconstruct_phema.main, [str(a) for a in args])


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("Error")]


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------
# 1. Exactness against the closed form.


def reconstruction_error(pkls, out_dir, eps_in):
    """Reconstruct sigma_rel 0.02, 0.15, 0.25 at T from ``pkls``; check the result two ways and
    return the largest error relative to the trajectory's amplitude."""
    out_stds = [0.02, 0.15, 0.25]
    steps = reconstruct_phema.reconstruct_phema(
        pkls, out_std=out_stds, out_dir=str(out_dir), verbose=False, trust_embedded_code=True
    )  # trusted load: faster, same values
    results = [out for step in steps for out in step.outputs]
    used = [p for p in pkls if p.nimg > 0]  # time-0 snapshots must be ignored
    assert [r.std for r in results] == out_stds and len(steps) == len(used)
    X, resid = reference_coefficients([p.nimg for p in used], [p.std for p in used], T, out_stds)
    W = stored_inputs([p.path for p in used])  # what the inputs hold, exactly
    worst = 0
    for o, r in enumerate(results):
        assert os.path.basename(r.path) == f"phema-{T // 1000:07d}-{out_stds[o]:.3f}.pkl"
        got = flat_params(load(r.path)["ema"])
        # (a) The tool computes sum_i X[i,o] w_i: float32 sums, then one float16 rounding.
        expected = X[:, o] @ W
        tol = 2**-11 * np.abs(expected) + 1e-6 * (np.abs(X[:, o]) @ np.abs(W)) + 1e-7
        assert np.all(np.abs(got - expected) <= tol)
        # (b) Against the analytic EMA. The inputs are the exact EMAs w_i = <p_i, w> (up to
        # their rounding eps_in), so the error is <sum_i X_i p_i - p_o, w>, which Cauchy-Schwarz
        # bounds by ||residual profile|| * ||w_e||, with ||w_e||^2 = amp^2 / (2k + 1) in units of
        # T; add the rounding of the inputs (amplified by sum |X_i|) and of the float16 output.
        analytic = analytic_ema(T, out_stds[o], ELEM_AMP, ELEM_K)
        bound = (
            resid[o] * np.abs(ELEM_AMP) / np.sqrt(2 * ELEM_K + 1)
            + eps_in * (np.abs(X[:, o]) @ np.abs(W))
            + 2**-11 * np.abs(analytic)
            + 1e-6
        )
        err = np.abs(got - analytic)
        assert np.all(err <= bound), (len(used), out_stds[o], np.max(err / bound))
        worst = max(worst, np.max(err / np.abs(ELEM_AMP)))
    return worst


@pytest.mark.slow
def test_reconstruction_matches_analytic_ema(snapshots32, tmp_path):
    all_pkls = reconstruct_phema.list_input_pickles(snapshots32.folder)
    assert len(all_pkls) == 66
    errors = []
    for n in [4, 8, 16, 32]:
        pkls = [p for p in all_pkls if p.nimg % (T // n) == 0]
        errors.append(reconstruction_error(pkls, tmp_path / f"n{n}", eps_in=2**-24))
    # More snapshots, better fit: the error shrinks at every doubling and is small with 32
    # (its bound above is what justifies the tolerance for each count).
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 5e-3, errors


def test_reconstruction_from_float16_snapshots(snapshots, tmp_path):
    # Real snapshots are float16; their rounding enters the bound through eps_in.
    pkls = reconstruct_phema.list_input_pickles(snapshots.folder)
    assert reconstruction_error(pkls, tmp_path, eps_in=2**-11) < 0.03


def test_output_format_and_buffers(snapshots, tmp_path):
    res = run_cli("--indir", snapshots.folder, "--outdir", tmp_path, "--outstd", "0.15")
    assert res.exit_code == 0, res.output
    data = load(tmp_path / f"phema-{T // 1000:07d}-0.150.pkl")
    first = load(snapshots.paths[(T // 8, 0.05)])  # the first used input: lowest time, then lowest std
    last = load(snapshots.paths[(T, 0.1)])
    assert isinstance(data, dnnlib.EasyDict) and list(data.keys()) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    assert data.dataset_kwargs == first.dataset_kwargs and type(data.loss_fn).__name__ == "EDM2Loss"
    assert isinstance(data.encoder, encoders.StandardRGBEncoder)
    ema = data.ema
    assert not ema.training and all(not m.training for m in ema.modules())
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in ema.parameters())
    assert all(b.dtype == torch.float16 for b in ema.buffers())
    for b, b_last in zip(ema.buffers(), last.ema.buffers()):
        assert torch.equal(b, b_last)  # buffers come from the last input
    assert ema.img_resolution == 8 and ema.label_dim == 0
    # The output is a network the safe loader accepts and that runs.
    from torch_utils import persistence

    net = persistence.safe_load(str(tmp_path / f"phema-{T // 1000:07d}-0.150.pkl"))["ema"].float()
    assert net(torch.randn(2, 3, 8, 8), torch.ones(2)).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------
# 3. --outstd parsing.


def test_outstd_list_syntax():
    assert reconstruct_phema.parse_std_list("0.01,0.02,...,0.05") == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert len(reconstruct_phema.parse_std_list("0.010,0.015,...,0.250")) == 49
    assert reconstruct_phema.parse_std_list("0.150") == [0.15]
    assert reconstruct_phema.parse_std_list("0.2, 0.05,0.1,0.05") == [0.05, 0.1, 0.2]  # deduplicated, sorted
    assert reconstruct_phema.parse_std_list("0.05,0.04,...,0.01,0.2") == [0.01, 0.02, 0.03, 0.04, 0.05, 0.2]
    values = reconstruct_phema.parse_std_list("0.1,0.2,...,0.2")
    assert values == [0.1, 0.2]


@pytest.mark.parametrize(
    "value, reason",
    [
        ("...,0.02,0.03", "first"),
        ("0.01,0.02,...", "last"),
        ("0.01,...,0.05", "two values before"),
        ("0.01,0.02,...,0.055", "unevenly spaced"),
        ("0.02,0.02,...,0.05", "equal values"),
        ("0.01,0.02,...,...,0.05", "two values before"),
        ("0.05,0.06,...,0.01", "never reaches"),
        ("0.3", "outside"),
        ("0", "outside"),
        ("-0.05", "outside"),
        ("0.289", "outside"),
        ("0.01,0.02,...,0.30", "outside"),
        ("0.05,abc", "not a number"),
        ("0.05,,0.1", "empty"),
        ("0.0501,0.0502", "both be saved"),
    ],
)
def test_outstd_malformed_gives_one_line(tmp_path, value, reason):
    res = run_cli("--indir", tmp_path, "--outdir", tmp_path / "out", "--outstd", value)
    assert res.exit_code != 0
    lines = error_lines(res.output)
    assert len(lines) == 1 and "--outstd" in lines[0] and reason in lines[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# 4. --outkimg, filters, --skip, names.


def test_outkimg_uses_only_earlier_inputs(snapshots, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    times = [T // 8 * i for i in range(1, 5)]
    for nimg in times:
        for std in (0.05, 0.1):
            os.link(snapshots.paths[(nimg, std)], folder / os.path.basename(snapshots.paths[(nimg, std)]))
    late = folder / f"network-snapshot-{(T // 8 * 6) // 1000:07d}-0.050.pkl"
    late.write_bytes(b"not a pickle: reading this would fail")
    counter = OpenCounter(monkeypatch)
    out_kimg = times[-1] // 1000
    res = run_cli("--indir", folder, "--outdir", tmp_path / "out", "--outstd", "0.07", "--outkimg", out_kimg)
    assert res.exit_code == 0, res.output
    assert late.name not in counter.counts
    got = flat_params(load(tmp_path / "out" / f"phema-{out_kimg:07d}-0.070.pkl")["ema"])
    used = [(t, s) for t in times for s in (0.05, 0.1)]
    X, _ = reference_coefficients([t for t, _ in used], [s for _, s in used], times[-1], [0.07])
    expected = X[:, 0] @ stored_inputs([snapshots.paths[u] for u in used])
    assert np.all(np.abs(got - expected) <= 2**-11 * np.abs(expected) + 1e-6)
    # An --outkimg that is not an input time is refused.
    for bad in [times[-1] // 1000 + 1, 10**6]:
        res = run_cli("--indir", folder, "--outdir", tmp_path / "out2", "--outstd", "0.07", "--outkimg", bad)
        assert res.exit_code != 0 and len(error_lines(res.output)) == 1, res.output
        assert "does not match" in res.output or "not the time of a snapshot" in res.output
    assert not (tmp_path / "out2").exists() or not os.listdir(tmp_path / "out2")


def test_instd_and_inprefix_filter(snapshots, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    times = [T // 4 * i for i in range(1, 5)]
    for nimg in times:
        for std in (0.05, 0.1):
            os.link(snapshots.paths[(nimg, std)], folder / os.path.basename(snapshots.paths[(nimg, std)]))
        # Same times and sigma_rel under another prefix, unreadable: must be filtered out.
        (folder / f"other-{nimg // 1000:07d}-0.050.pkl").write_bytes(b"garbage")
    (folder / "notes.txt").write_text("not a snapshot")
    (folder / "network-snapshot-0000042-0.050.pkl").write_bytes(b"kimg 42 is no multiple of 1024 images")

    # Without --inprefix, two inputs share a time and sigma_rel: refused with a hint.
    res = run_cli("--indir", folder, "--outdir", tmp_path / "o0", "--outstd", "0.07")
    assert res.exit_code != 0 and "--inprefix" in error_lines(res.output)[0], res.output

    counter = OpenCounter(monkeypatch)
    res = run_cli(
        "--indir",
        folder,
        "--outdir",
        tmp_path / "o1",
        "--outstd",
        "0.07",
        "--inprefix",
        "network-snapshot",
        "--instd",
        "0.05",
    )
    assert res.exit_code == 0, res.output
    expected_names = {f"network-snapshot-{t // 1000:07d}-0.050.pkl" for t in times}
    assert counter.counts == {name: 1 for name in expected_names}
    got = flat_params(load(tmp_path / "o1" / f"phema-{T // 1000:07d}-0.070.pkl")["ema"])
    X, _ = reference_coefficients(times, [0.05] * 4, T, [0.07])
    expected = X[:, 0] @ stored_inputs([snapshots.paths[(t, 0.05)] for t in times])
    assert np.all(np.abs(got - expected) <= 2**-11 * np.abs(expected) + 1e-6)

    pkls = reconstruct_phema.list_input_pickles(str(folder), in_prefix="other", in_std=[0.05])
    assert [(p.prefix, p.nimg, p.std) for p in pkls] == [("other", t, 0.05) for t in times]


def test_input_names_any_kimg_digits(tmp_path):
    for name in ["a-1-0.050.pkl", "a-00000005-0.100.pkl", "a-b-12-0.050.pkl", "a-42-0.050.pkl", "a-7.pkl"]:
        (tmp_path / name).write_bytes(b"")
    pkls = reconstruct_phema.list_input_pickles(str(tmp_path))
    assert [(p.prefix, p.nimg, p.std) for p in pkls] == [("a", 1024, 0.05), ("a", 5120, 0.1), ("a-b", 12288, 0.05)]


def test_skip_and_names(snapshots, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for nimg in (T // 2, T):
        for std in (0.05, 0.1):
            os.link(snapshots.paths[(nimg, std)], folder / os.path.basename(snapshots.paths[(nimg, std)]))
    out = tmp_path / "out"
    out.mkdir()
    existing = out / f"mine-{T // 1000:07d}-0.150.pkl"
    existing.write_bytes(b"keep me")
    os.utime(existing, (1_000_000, 1_000_000))

    counter = OpenCounter(monkeypatch)
    res = run_cli("--indir", folder, "--outdir", out, "--outprefix", "mine", "--outstd", "0.15,0.2", "--skip")
    assert res.exit_code == 0, res.output
    assert existing.read_bytes() == b"keep me" and os.stat(existing).st_mtime == 1_000_000
    assert sorted(os.listdir(out)) == [f"mine-{T // 1000:07d}-0.150.pkl", f"mine-{T // 1000:07d}-0.200.pkl"]
    assert sum(counter.counts.values()) == 4  # one pass for the one missing output

    # Everything exists: no input is read at all.
    counter.counts.clear()
    res = run_cli("--indir", folder, "--outdir", out, "--outprefix", "mine", "--outstd", "0.15,0.2", "--skip")
    assert res.exit_code == 0 and counter.counts == {}, res.output
    assert existing.read_bytes() == b"keep me"
    # Without --skip, outputs are rebuilt.
    res = run_cli("--indir", folder, "--outdir", out, "--outprefix", "mine", "--outstd", "0.15")
    assert res.exit_code == 0 and existing.read_bytes() != b"keep me"
    assert sum(counter.counts.values()) == 4


# ----------------------------------------------------------------------------
# 5. Streaming: each input is read once per batch of outputs.


@pytest.mark.slow
def test_each_input_read_once_per_batch(snapshots, tmp_path, monkeypatch):
    pkls = [p for p in reconstruct_phema.list_input_pickles(snapshots.folder) if p.nimg % (T // 4) == 0 and p.nimg > 0]
    counter = OpenCounter(monkeypatch)
    out_stds = [0.02, 0.05, 0.08, 0.11, 0.14]
    steps = reconstruct_phema.reconstruct_phema(
        pkls, out_std=out_stds, out_dir=str(tmp_path), max_batch_size=2, verbose=False
    )
    seen = []
    for step in steps:
        seen.append((step.batch_idx, os.path.basename(step.in_pkl.path), tuple(step.out_std), len(step.outputs)))
    names = [os.path.basename(p.path) for p in pkls]
    # ceil(5 / 2) = 3 near-equal groups, each a full pass over the inputs in (nimg, std) order.
    groups = [(0.02, 0.05), (0.08, 0.11), (0.14,)]
    assert seen == [
        (b, name, groups[b], len(groups[b]) if name == names[-1] else 0) for b in range(3) for name in names
    ]
    assert counter.counts == {name: 3 for name in names}
    assert len(os.listdir(tmp_path)) == 5
    # In-memory use from Python: no output directory, results in the steps.
    outs = [o for step in reconstruct_phema.reconstruct_phema(pkls, out_std=0.1, verbose=False) for o in step.outputs]
    assert len(outs) == 1 and outs[0].path is None and outs[0].data.ema.unet.out_gain.dtype == torch.float16


def test_reference_signatures(snapshots, tmp_path):
    # list_input_pickles(in_dir, in_prefix=None, in_std=None) and reconstruct_phema(in_pkls, out_std,
    # out_nimg=None, out_dir=None, out_prefix='phema', skip_existing=False, max_batch_size=8, verbose=True).
    pkls = reconstruct_phema.list_input_pickles(snapshots.folder, "network-snapshot", [0.05, 0.1])
    assert [(p.nimg, p.std) for p in pkls] == sorted((p.nimg, p.std) for p in pkls) and len(pkls) == 18
    pkls = [p for p in pkls if p.nimg in (T // 2, T)]
    steps, finished = [], []
    for step in reconstruct_phema.reconstruct_phema(pkls, [0.07, 0.15], T, str(tmp_path), "ref", False, 1, False):
        steps.append(step)
        finished.append(step.out[0].net is not None)
    assert finished == [False, False, False, True] * 2  # a pass's networks are ready at its last step
    assert [(s.step_idx, s.num_steps) for s in steps] == [(i, 8) for i in range(8)]
    finals = [steps[3], steps[7]]  # the last step of each of the two passes
    W = stored_inputs([p.path for p in pkls])
    for step, std in zip(finals, [0.07, 0.15]):
        (out,) = step.out
        assert (out.std, out.nimg) == (std, T) and out.net is out.pkl_data["ema"]
        assert out.pkl_path == str(tmp_path / f"ref-{T // 1000:07d}-{std:.3f}.pkl") and os.path.isfile(out.pkl_path)
        X, _ = reference_coefficients([p.nimg for p in pkls], [p.std for p in pkls], T, [std])
        expected = X[:, 0] @ W
        assert np.all(np.abs(flat_params(out.net) - expected) <= 2**-11 * np.abs(expected) + 1e-6)


# ----------------------------------------------------------------------------
# 6. Failures: one clear line, no partial output.


def test_missing_empty_and_unusable_inputs(tmp_path):
    res = run_cli("--indir", tmp_path / "nope", "--outdir", tmp_path / "out", "--outstd", "0.1")
    assert res.exit_code != 0 and len(error_lines(res.output)) == 1 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = run_cli("--indir", tmp_path / "empty", "--outdir", tmp_path / "out", "--outstd", "0.1")
    assert res.exit_code != 0 and len(error_lines(res.output)) == 1 and "No input snapshots" in res.output
    # Only snapshots at time 0: nothing usable.
    (tmp_path / "zero").mkdir()
    write_snapshot(str(tmp_path / "zero"), 0, 0.05)
    res = run_cli("--indir", tmp_path / "zero", "--outdir", tmp_path / "out", "--outstd", "0.1")
    assert res.exit_code != 0 and len(error_lines(res.output)) == 1 and "No usable inputs" in res.output
    # Filters that match nothing.
    res = run_cli("--indir", tmp_path / "zero", "--outdir", tmp_path / "out", "--outstd", "0.1", "--instd", "0.1")
    assert res.exit_code != 0 and len(error_lines(res.output)) == 1 and "No input snapshots" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_input_names_file_and_leaves_nothing(snapshots, tmp_path, damage):
    folder = tmp_path / "in"
    folder.mkdir()
    for nimg in (T // 2, T):
        os.link(snapshots.paths[(nimg, 0.05)], folder / os.path.basename(snapshots.paths[(nimg, 0.05)]))
    bad = folder / f"network-snapshot-{(T // 2) // 1000:07d}-0.100.pkl"  # a middle input
    if damage == "truncated":
        data = open(snapshots.paths[(T // 2, 0.1)], "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x80\x04garbage that is no pickle")
    else:  # a valid pickle of something the safe loader must refuse
        bad.write_bytes(pickle.dumps(dnnlib.EasyDict(ema=torch.nn.Linear(2, 2))))
    out = tmp_path / "out"
    res = run_cli("--indir", folder, "--outdir", out, "--outstd", "0.07,0.15", "--batch", "1")
    assert res.exit_code != 0
    lines = error_lines(res.output)
    assert len(lines) == 1 and str(bad) in lines[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists() or os.listdir(out) == []


def test_bad_destination_fails_before_reading(snapshots, tmp_path, monkeypatch):
    counter = OpenCounter(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for outdir in (blocker, blocker / "sub"):
        res = run_cli("--indir", snapshots.folder, "--outdir", outdir, "--outstd", "0.1")
        assert res.exit_code != 0 and "Traceback" not in res.output
        lines = error_lines(res.output)
        assert len(lines) == 1 and "Cannot create output directory" in lines[0] and "--outdir" in lines[0], res.output
    assert counter.counts == {}


def test_refuses_to_overwrite_an_input(snapshots, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for nimg in (T // 2, T):
        for std in (0.05, 0.1):
            os.link(snapshots.paths[(nimg, std)], folder / os.path.basename(snapshots.paths[(nimg, std)]))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    res = run_cli("--indir", folder, "--outdir", folder, "--outprefix", "network-snapshot", "--outstd", "0.05,0.07")
    assert res.exit_code != 0 and "overwrite" in error_lines(res.output)[0], res.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_failed_write_leaves_no_partial_file(snapshots, tmp_path, monkeypatch):
    pkls = [p for p in reconstruct_phema.list_input_pickles(snapshots.folder) if p.nimg == T]
    real_dump = pickle.dump

    def failing_dump(obj, f, *args, **kwargs):
        real_dump(obj, f, *args, **kwargs)
        if isinstance(f, io.BytesIO):  # in-memory pickling (e.g. persistent_class's own check) works
            return
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pickle, "dump", failing_dump)
    with pytest.raises(OSError, match="No space left"):
        for _ in reconstruct_phema.reconstruct_phema(pkls, out_std=0.1, out_dir=str(tmp_path), verbose=False):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_refuses_torchrun(snapshots, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO_ROOT, "reconstruct_phema.py"),
        "--indir",
        snapshots.folder,
        "--outdir",
        str(tmp_path / "out"),
        "--outstd",
        "0.1",
    ]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    output = res.stdout + res.stderr
    ours = [line for line in output.splitlines() if re.search(r"Error: .*single process", line)]
    assert len(ours) == 1, output
    assert 'reconstruct_phema.py", line' not in output  # no traceback from our script
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# 2. End to end: train_edm2.py snapshots -> reconstruct_phema.py -> generate_images.py.


@pytest.mark.slow
def test_end_to_end_train_reconstruct_generate(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(32):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(data / f"img{i:08d}.png")
    run = tmp_path / "run"
    env = subprocess_env()
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "train_edm2.py"),
        f"--outdir={run}",
        f"--data={data}",
        "--cond=False",
        "--preset=cpu-16",
        "--duration=2Ki",
        "--batch=256",
        "--status=1Ki",
        "--snapshot=1Ki",
        "--checkpoint=2Ki",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.path.isfile(run / "network-snapshot-0000002-0.100.pkl")

    out = tmp_path / "out"
    res = run_cli("--indir", run, "--outdir", out, "--outstd", "0.100,0.150")
    assert res.exit_code == 0, res.output
    assert "Inputs: 4 snapshots from kimg 1 to 2" in res.output  # the image-0 snapshots are not used
    assert sorted(os.listdir(out)) == ["phema-0000002-0.100.pkl", "phema-0000002-0.150.pkl"]
    # Asking for a profile that was tracked during training gives that snapshot back.
    same = flat_params(load(out / "phema-0000002-0.100.pkl")["ema"])
    snap = flat_params(load(run / "network-snapshot-0000002-0.100.pkl")["ema"])
    assert np.all(np.abs(same - snap) <= 2**-10 * np.abs(snap) + 1e-6)
    # And another profile is the combination that the closed form prescribes.
    used = [(nimg, std) for nimg in (1024, 2048) for std in (0.05, 0.1)]
    X, _ = reference_coefficients([u[0] for u in used], [u[1] for u in used], 2048, [0.15])
    W = stored_inputs([str(run / f"network-snapshot-{nimg // 1000:07d}-{std:.3f}.pkl") for nimg, std in used])
    expected = X[:, 0] @ W
    got = flat_params(load(out / "phema-0000002-0.150.pkl")["ema"])
    assert np.all(np.abs(got - expected) <= 2**-11 * np.abs(expected) + 1e-6 * (np.abs(X[:, 0]) @ np.abs(W)) + 1e-7)

    images = tmp_path / "images"
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "generate_images.py"),
        f"--net={out / 'phema-0000002-0.150.pkl'}",
        f"--outdir={images}",
        "--seeds=0-1",
        "--steps=4",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(os.listdir(images)) == ["000000.png", "000001.png"]
    for name in os.listdir(images):
        img = np.asarray(Image.open(images / name))
        assert img.shape == (8, 8, 3) and img.dtype == np.uint8


def test_output_keeps_the_embedded_sources_of_its_inputs(tmp_path, monkeypatch, capsys):
    # Snapshots written by another revision of the network module (e.g. the official release): the
    # reconstruction is rebuilt with our code, but its pickle embeds the inputs' source, as the
    # reference's outputs do (they are copies of the input objects).
    from tests.test_persistence import NETWORK_CLASSES, embedded_sources

    edited_src = networks_edm2.Precond._orig_module_src + "\n# Another revision of the same network.\n"
    with monkeypatch.context() as m:
        for cls in NETWORK_CLASSES:
            m.setattr(cls, "_orig_module_src", edited_src)
        for nimg in (T // 2, T):
            for std in (0.05, 0.1):
                write_snapshot(str(tmp_path), nimg, std)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pkls = reconstruct_phema.list_input_pickles(str(tmp_path))
    for _ in reconstruct_phema.reconstruct_phema(pkls, out_std=[0.07], out_dir=str(out_dir), verbose=False):
        pass
    assert "rebuilding with the standard code" in capsys.readouterr().err
    (out_path,) = out_dir.iterdir()
    sources = embedded_sources(out_path.read_bytes())
    assert {name: src == edited_src for name, src in sources.items() if name in ("MPConv", "UNet", "Precond")} == {
        "MPConv": True,
        "UNet": True,
        "Precond": True,
    }
