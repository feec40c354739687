"""Tests of generate_images.py: presets, the command line, per-seed determinism across batches and
processes, loading from paths and URLs and error messages.

Networks are tiny randomly initialised ``Precond`` models pickled in the snapshot layout of the
reference's network pickles.
"""

import importlib.util
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import generate_images as gi
from tests.conftest import REPO_ROOT, assert_ok, assert_one_line_error, assert_torchrun_succeeded, subprocess_env
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder
from training.networks_edm2 import Precond
from training.training_loop import EDM2Loss

ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"

# The presets of the two papers, transcribed: preset -> (net, gnet, guidance).
SPEC_PRESETS = {
    "edm2-img512-xs-fid": ("edm2-img512-xs-2147483-0.135", None, None),
    "edm2-img512-xs-dino": ("edm2-img512-xs-2147483-0.200", None, None),
    "edm2-img512-s-fid": ("edm2-img512-s-2147483-0.130", None, None),
    "edm2-img512-s-dino": ("edm2-img512-s-2147483-0.190", None, None),
    "edm2-img512-m-fid": ("edm2-img512-m-2147483-0.100", None, None),
    "edm2-img512-m-dino": ("edm2-img512-m-2147483-0.155", None, None),
    "edm2-img512-l-fid": ("edm2-img512-l-1879048-0.085", None, None),
    "edm2-img512-l-dino": ("edm2-img512-l-1879048-0.155", None, None),
    "edm2-img512-xl-fid": ("edm2-img512-xl-1342177-0.085", None, None),
    "edm2-img512-xl-dino": ("edm2-img512-xl-1342177-0.155", None, None),
    "edm2-img512-xxl-fid": ("edm2-img512-xxl-0939524-0.070", None, None),
    "edm2-img512-xxl-dino": ("edm2-img512-xxl-0939524-0.150", None, None),
    "edm2-img64-s-fid": ("edm2-img64-s-1073741-0.075", None, None),
    "edm2-img64-m-fid": ("edm2-img64-m-2147483-0.060", None, None),
    "edm2-img64-l-fid": ("edm2-img64-l-1073741-0.040", None, None),
    "edm2-img64-xl-fid": ("edm2-img64-xl-0671088-0.040", None, None),
    "edm2-img512-xs-guid-fid": ("edm2-img512-xs-2147483-0.045", "edm2-img512-xs-uncond-2147483-0.045", 1.40),
    "edm2-img512-xs-guid-dino": ("edm2-img512-xs-2147483-0.150", "edm2-img512-xs-uncond-2147483-0.150", 1.70),
    "edm2-img512-s-guid-fid": ("edm2-img512-s-2147483-0.025", "edm2-img512-xs-uncond-2147483-0.025", 1.40),
    "edm2-img512-s-guid-dino": ("edm2-img512-s-2147483-0.085", "edm2-img512-xs-uncond-2147483-0.085", 1.90),
    "edm2-img512-m-guid-fid": ("edm2-img512-m-2147483-0.030", "edm2-img512-xs-uncond-2147483-0.030", 1.20),
    "edm2-img512-m-guid-dino": ("edm2-img512-m-2147483-0.015", "edm2-img512-xs-uncond-2147483-0.015", 2.00),
    "edm2-img512-l-guid-fid": ("edm2-img512-l-1879048-0.015", "edm2-img512-xs-uncond-2147483-0.015", 1.20),
    "edm2-img512-l-guid-dino": ("edm2-img512-l-1879048-0.035", "edm2-img512-xs-uncond-2147483-0.035", 1.70),
    "edm2-img512-xl-guid-fid": ("edm2-img512-xl-1342177-0.020", "edm2-img512-xs-uncond-2147483-0.020", 1.20),
    "edm2-img512-xl-guid-dino": ("edm2-img512-xl-1342177-0.030", "edm2-img512-xs-uncond-2147483-0.030", 1.70),
    "edm2-img512-xxl-guid-fid": ("edm2-img512-xxl-0939524-0.015", "edm2-img512-xs-uncond-2147483-0.015", 1.20),
    "edm2-img512-xxl-guid-dino": ("edm2-img512-xxl-0939524-0.015", "edm2-img512-xs-uncond-2147483-0.015", 1.70),
    "edm2-img512-s-autog-fid": ("edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125", 2.10),
    "edm2-img512-s-autog-dino": ("edm2-img512-s-2147483-0.120", "edm2-img512-xs-0134217-0.165", 2.45),
    "edm2-img512-xxl-autog-fid": ("edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", 2.05),
    "edm2-img512-xxl-autog-dino": ("edm2-img512-xxl-0939524-0.130", "edm2-img512-m-0268435-0.205", 2.30),
    "edm2-img512-s-uncond-autog-fid": (
        "edm2-img512-s-uncond-2147483-0.070",
        "edm2-img512-xs-uncond-0134217-0.110",
        2.85,
    ),
    "edm2-img512-s-uncond-autog-dino": (
        "edm2-img512-s-uncond-2147483-0.090",
        "edm2-img512-xs-uncond-0134217-0.125",
        2.90,
    ),
    "edm2-img64-s-autog-fid": ("edm2-img64-s-1073741-0.045", "edm2-img64-xs-0134217-0.110", 1.70),
    "edm2-img64-s-autog-dino": ("edm2-img64-s-1073741-0.105", "edm2-img64-xs-0134217-0.175", 2.20),
}

# ----------------------------------------------------------------------------
# Tiny networks in the snapshot layout.


def make_net(label_dim=0, img_channels=3, img_resolution=8, seed=0):
    torch.manual_seed(seed)
    net = Precond(
        img_resolution=img_resolution,
        img_channels=img_channels,
        label_dim=label_dim,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
    )
    with torch.no_grad():
        # A fresh network has zero output and modulation gains, i.e. F = 0 and no label effect;
        # make every part of it count.
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net.eval().requires_grad_(False).half()  # snapshot nets are float16, eval mode


def write_snapshot(path, net, encoder=None):
    data = dnnlib.EasyDict(
        encoder=encoder if encoder is not None else StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="data.zip", use_labels=net.label_dim > 0
        ),
        loss_fn=EDM2Loss(),
        ema=net,
    )
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nets")
    return dnnlib.EasyDict(
        cond=write_snapshot(root / "cond.pkl", make_net(label_dim=4, seed=1)),
        uncond=write_snapshot(root / "uncond.pkl", make_net(label_dim=0, seed=2)),
    )


@pytest.fixture
def vae_net(tmp_path):
    """A latent-space snapshot whose encoder is a tiny local AutoencoderKL (downsampling 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(tmp_path / "vae")
    return write_snapshot(
        tmp_path / "vae.pkl",
        make_net(img_channels=4, seed=3),
        encoder=StabilityVAEEncoder(vae_name=str(tmp_path / "vae")),
    )


@pytest.fixture
def run_cli(single_process_cli):
    """Run the command line in this process (see conftest.single_process_cli)."""
    return lambda *args: single_process_cli(gi.cmdline, *args)


def read_images(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): np.asarray(PIL.Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def load_gen_record():
    spec = importlib.util.spec_from_file_location("gen_record", REPO_ROOT / "tests" / "scripts" / "gen_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------
# Seeds and presets.


def test_parse_int_list():
    assert gi.parse_int_list("1,2,5-10") == [1, 2, 5, 6, 7, 8, 9, 10]
    assert gi.parse_int_list("7,3,3, 0-2") == [7, 3, 3, 0, 1, 2]  # order and duplicates kept
    assert gi.parse_int_list("16-19") == [16, 17, 18, 19]
    assert gi.parse_int_list("4-4") == [4]
    assert gi.parse_int_list([3, 1]) == [3, 1]
    for bad in ("", "a", "1,,2", "1-", "-3", "5-2", "1.5", "1-2-3"):
        with pytest.raises(ValueError):
            gi.parse_int_list(bad)


def test_presets_expand_to_spec():
    assert set(gi.config_presets) == set(SPEC_PRESETS) and len(gi.config_presets) == 36
    for name, (net, gnet, guidance) in SPEC_PRESETS.items():
        opts = gi.resolve_options(name)
        assert opts.net == f"{ROOT}/{net}.pkl"
        assert opts.gnet == (f"{ROOT}/{gnet}.pkl" if gnet else None)
        assert opts.guidance == (guidance if guidance else 1)


def test_command_line_overrides_preset():
    opts = gi.resolve_options("edm2-img512-s-guid-fid", net="a.pkl")
    assert (opts.net, opts.gnet, opts.guidance) == ("a.pkl", f"{ROOT}/edm2-img512-xs-uncond-2147483-0.025.pkl", 1.4)
    opts = gi.resolve_options("edm2-img512-s-guid-fid", gnet="g.pkl", guidance=3.0)
    assert (opts.net, opts.gnet, opts.guidance) == (f"{ROOT}/edm2-img512-s-2147483-0.025.pkl", "g.pkl", 3.0)
    opts = gi.resolve_options("edm2-img512-s-guid-fid", guidance=1.0)  # guidance 1 drops the guiding net
    assert opts.gnet is None and opts.guidance == 1
    opts = gi.resolve_options("edm2-img512-xs-fid", gnet="g.pkl", guidance=2.0)
    assert (opts.net, opts.gnet, opts.guidance) == (f"{ROOT}/edm2-img512-xs-2147483-0.135.pkl", "g.pkl", 2.0)
    opts = gi.resolve_options(net="a.pkl", gnet="g.pkl")  # no guidance given: the guiding net is unused
    assert opts.gnet is None and opts.guidance == 1


@pytest.mark.slow
def test_preset_runs_from_download_cache(nets, tmp_path, cache_dir, run_cli, monkeypatch):
    # Place tiny networks in the download cache under the preset's real URLs; any attempt to
    # reach the internet instead goes to a closed local port and fails.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True)
    net_url, gnet_url = f"{ROOT}/edm2-img512-xs-2147483-0.045.pkl", f"{ROOT}/edm2-img512-xs-uncond-2147483-0.045.pkl"
    (downloads / dnnlib.util.cache_file_name(net_url)).write_bytes(Path(nets.cond).read_bytes())
    (downloads / dnnlib.util.cache_file_name(gnet_url)).write_bytes(Path(nets.uncond).read_bytes())

    assert_ok(
        run_cli("--preset", "edm2-img512-xs-guid-fid", "--outdir", tmp_path / "preset", "--seeds", "0-2", "--steps", 3)
    )
    expected = tmp_path / "expected"
    for _ in gi.generate_images(
        nets.cond, gnet=nets.uncond, guidance=1.4, outdir=str(expected), seeds=[0, 1, 2], num_steps=3, verbose=False
    ):
        pass
    images, ref = read_images(tmp_path / "preset"), read_images(expected)
    assert list(images) == ["000000.png", "000001.png", "000002.png"] == list(ref)
    assert all(np.array_equal(images[k], ref[k]) for k in ref)
    unguided = tmp_path / "unguided"
    for _ in gi.generate_images(nets.cond, outdir=str(unguided), seeds=[0, 1, 2], num_steps=3, verbose=False):
        pass
    assert not all(np.array_equal(images[k], v) for k, v in read_images(unguided).items())  # guidance mattered

    # Explicit guidance 1 overrides the preset: the guiding network is not even loaded.
    (downloads / dnnlib.util.cache_file_name(gnet_url)).unlink()
    assert_ok(
        run_cli(
            "--preset",
            "edm2-img512-xs-guid-fid",
            "--guidance",
            1,
            "--outdir",
            tmp_path / "g1",
            "--seeds",
            "0-2",
            "--steps",
            3,
        )
    )
    assert all(np.array_equal(read_images(tmp_path / "g1")[k], v) for k, v in read_images(unguided).items())


# ----------------------------------------------------------------------------
# Errors: one clear line each.


def test_usage_errors(run_cli, tmp_path, nets):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--outdir", out), "--preset", "--net")
    assert_one_line_error(run_cli("--preset", "edm2-img512-nope", "--outdir", out), "edm2-img512-nope")
    assert_one_line_error(run_cli("--net", nets.cond, "--guidance", 2, "--outdir", out), "--gnet")
    assert_one_line_error(run_cli("--net", nets.cond, "--seeds", "1-x", "--outdir", out), "--seeds", "1-x")
    assert_one_line_error(run_cli("--net", nets.cond, "--seeds", "9-2", "--outdir", out), "--seeds", "9-2")
    assert_one_line_error(run_cli("--net", nets.cond, "--class", 4, "--outdir", out), "Class index 4")
    assert not out.exists()


def test_load_errors(run_cli, tmp_path, http_server, cache_dir):
    out = tmp_path / "out"
    # Unreachable URLs: a missing file on a live server, and a port nobody listens on.
    assert_one_line_error(run_cli("--net", http_server.url("missing.pkl"), "--outdir", out), "missing.pkl", "404")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_one_line_error(run_cli("--net", f"http://127.0.0.1:{port}/net.pkl", "--outdir", out), "Cannot open")
    assert_one_line_error(
        run_cli("--net", tmp_path / "nonexistent.pkl", "--outdir", out), "Cannot open", "nonexistent.pkl"
    )

    # Files that are not network pickles.
    (tmp_path / "noise.pkl").write_bytes(os.urandom(1000))
    assert_one_line_error(run_cli("--net", tmp_path / "noise.pkl", "--outdir", out), "not a network pickle")
    (tmp_path / "empty.pkl").write_bytes(b"")
    assert_one_line_error(run_cli("--net", tmp_path / "empty.pkl", "--outdir", out), "not a network pickle")
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps(dnnlib.EasyDict(foo=1)))
    assert_one_line_error(run_cli("--net", tmp_path / "dict.pkl", "--outdir", out), "not a network pickle")

    # A pickle naming a class the safe loader does not know.
    import fractions

    (tmp_path / "foreign.pkl").write_bytes(pickle.dumps(dnnlib.EasyDict(ema=fractions.Fraction(1, 3))))
    assert_one_line_error(
        run_cli("--net", tmp_path / "foreign.pkl", "--outdir", out), "fractions", "--trust-embedded-code"
    )
    assert_one_line_error(
        run_cli("--net", tmp_path / "foreign.pkl", "--outdir", out, "--trust-embedded-code"), "not a network pickle"
    )
    assert not out.exists()


def test_network_pickle_loader(nets, tmp_path):
    from torch_utils import persistence

    assert gi.load_network_pickle is persistence.load_network_pickle  # one loader for every tool
    data = gi.load_network_pickle(nets.cond, verbose=False)
    assert isinstance(data["ema"], Precond) and isinstance(data["encoder"], StandardRGBEncoder)
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    (tmp_path / "noise.pkl").write_bytes(os.urandom(100))
    for source, fragment in [
        (str(tmp_path / "missing.pkl"), "Cannot open network pickle"),
        (str(tmp_path / "list.pkl"), "no 'ema' network"),
        (str(tmp_path / "noise.pkl"), "is not a network pickle"),
    ]:
        with pytest.raises(persistence.NetworkPickleError) as info:
            gi.load_network_pickle(source, verbose=False)
        assert isinstance(info.value, ValueError) and fragment in str(info.value) and source in str(info.value)
        assert "\n" not in str(info.value)


def test_unwritable_output(run_cli, tmp_path, nets):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert_one_line_error(
        run_cli("--net", nets.uncond, "--outdir", blocker / "sub", "--steps", 2), "Cannot create output directory"
    )
    assert_one_line_error(
        run_cli("--net", nets.uncond, "--outdir", blocker, "--steps", 2), "Cannot create output directory"
    )
    # A folder that cannot hold an image name (a directory already sits there).
    (tmp_path / "out" / "000016.png").mkdir(parents=True)
    assert_one_line_error(
        run_cli("--net", nets.uncond, "--outdir", tmp_path / "out", "--steps", 2, "--seeds", 16), "Cannot write"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["000016.png"]  # no temporary files left behind


# ----------------------------------------------------------------------------
# Per-seed determinism across batch sizes and processes.

SEED_ARGS = ["--seeds", "0-9", "--steps", "4", "--S_churn", "20"]
# Another sampler, guided by the unconditional net within a guidance interval.
SOLVER_ARGS = [
    "--seeds",
    "0-9",
    "--steps",
    "4",
    "--sampler",
    "dpmpp-2m",
    "--guidance",
    "2",
    "--guidance-interval",
    "1,30",
]


@pytest.fixture(scope="module")
def single_process_runs(nets, tmp_path_factory):
    """The conditional net with churn, random classes (--batch 1, 3, 8) and --class 2 (--batch 8); with
    dpmpp-2m and guidance (--batch 8)."""
    root = tmp_path_factory.mktemp("single")
    gen_record = load_gen_record()
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            mp.delenv(var, raising=False)
        try:
            for name, extra in [
                ("b1", [*SEED_ARGS, "--batch", "1"]),
                ("b3", [*SEED_ARGS, "--batch", "3"]),
                ("b8", [*SEED_ARGS, "--batch", "8"]),
                ("class", [*SEED_ARGS, "--batch", "8", "--class", "2"]),
                ("dpmpp", [*SOLVER_ARGS, "--gnet", nets.uncond, "--batch", "8"]),
            ]:
                outdir = root / name
                records = gen_record.run_recorded(["--net", nets.cond, "--outdir", str(outdir), *extra])
                runs[name] = dnnlib.EasyDict(records=records, images=read_images(outdir))
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return runs


def assert_same_draws(records, ref):
    assert sorted(records) == sorted(ref) == list(range(10))
    for seed in ref:
        assert [kind for kind, _ in records[seed]] == [kind for kind, _ in ref[seed]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(records[seed], ref[seed])), f"seed {seed}"


def assert_images_close(images, ref):
    assert list(images) == list(ref) == [f"{seed:06d}.png" for seed in range(10)]
    for name in ref:
        assert images[name].shape == (8, 8, 3) and images[name].dtype == np.uint8
        assert np.abs(images[name].astype(int) - ref[name].astype(int)).max() <= 1, name


@pytest.mark.slow
def test_seed_draws_follow_spec(single_process_runs):
    # Per seed, from its own generator: noise [C,H,W], its class, then one churn draw per step.
    records = single_process_runs["b8"].records
    for seed, draws in records.items():
        g = torch.Generator().manual_seed(seed)
        assert [kind for kind, _ in draws] == ["randn", "randint"] + ["randn"] * 4
        assert torch.equal(draws[0][1], torch.randn([3, 8, 8], generator=g))
        assert torch.equal(draws[1][1], torch.randint(4, size=[], generator=g))
        for _, churn in draws[2:]:
            assert torch.equal(churn, torch.randn([3, 8, 8], generator=g))
    assert len({int(draws[1][1]) for draws in records.values()}) > 1  # classes really vary by seed


def test_same_images_whatever_the_batch(single_process_runs):
    ref = single_process_runs["b8"]
    for name in ("b1", "b3", "class"):
        # The class is drawn even with --class, so noise and churn do not depend on it.
        assert_same_draws(single_process_runs[name].records, ref.records)
    for name in ("b1", "b3"):
        assert_images_close(single_process_runs[name].images, ref.images)
    # --class changes the images of seeds whose random class was another one.
    fixed = single_process_runs["class"].images
    changed = {f"{seed:06d}.png" for seed, draws in ref.records.items() if int(draws[1][1]) != 2}
    assert changed and all(not np.array_equal(fixed[k], ref.images[k]) for k in changed)
    assert all(np.array_equal(fixed[k], ref.images[k]) for k in set(fixed) - changed)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_same_images_across_processes(single_process_runs, nets, tmp_path):
    prefix = tmp_path / "record"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_ROOT / "tests" / "scripts" / "gen_record.py"),
        str(prefix),
        "--",
        "--net",
        nets.cond,
        "--outdir",
        str(tmp_path / "dist"),
        *SEED_ARGS,
        "--batch",
        "3",
        "--",
        "--net",
        nets.cond,
        "--outdir",
        str(tmp_path / "dist_class"),
        *SEED_ARGS,
        "--batch",
        "3",
        "--class",
        "2",
        "--",
        "--net",
        nets.cond,
        "--outdir",
        str(tmp_path / "dist_dpmpp"),
        *SOLVER_ARGS,
        "--gnet",
        nets.uncond,
        "--batch",
        "3",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_torchrun_succeeded(proc)
    per_rank = [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(2)]
    for run, name in enumerate(["b8", "class", "dpmpp"]):
        # Each rank generated its share (4 batches: rank 0 takes seeds 0-2, 6-7; rank 1 takes 3-5, 8-9).
        assert sorted(per_rank[0][run]) == [0, 1, 2, 6, 7] and sorted(per_rank[1][run]) == [3, 4, 5, 8, 9]
        merged = {**per_rank[0][run], **per_rank[1][run]}
        assert_same_draws(merged, single_process_runs[name].records)
    assert_images_close(read_images(tmp_path / "dist"), single_process_runs["b8"].images)
    assert_images_close(read_images(tmp_path / "dist_class"), single_process_runs["class"].images)
    assert_images_close(read_images(tmp_path / "dist_dpmpp"), single_process_runs["dpmpp"].images)


# ----------------------------------------------------------------------------
# End to end: paths, URLs, the download cache, subdirs, a VAE encoder.


@pytest.mark.slow
def test_sample_from_path_and_urls(nets, tmp_path, http_server, cache_dir, run_cli):
    args = ["--seeds", "998-1001", "--steps", "3", "--batch", "3"]
    http_server.routes["/nets/uncond.pkl"] = Path(nets.uncond).read_bytes()
    sources = {
        "path": nets.uncond,
        "file": Path(nets.uncond).as_uri(),
        "http": http_server.url("nets/uncond.pkl"),
        "http_again": http_server.url("nets/uncond.pkl"),
    }
    for name, source in sources.items():
        assert_ok(run_cli("--net", source, "--outdir", tmp_path / name, "--subdirs", *args))
    assert http_server.requests == ["/nets/uncond.pkl"]  # the second run used the download cache
    assert len(list((cache_dir / "downloads").iterdir())) == 1

    ref = read_images(tmp_path / "path")
    assert list(ref) == ["000000/000998.png", "000000/000999.png", "001000/001000.png", "001000/001001.png"]
    for name in sources:
        images = read_images(tmp_path / name)
        assert list(images) == list(ref) and all(np.array_equal(images[k], ref[k]) for k in ref)
    assert all(v.shape == (8, 8, 3) for v in ref.values())
    assert len({v.tobytes() for v in ref.values()}) == 4

    # Without --subdirs the images sit directly in the output folder; nothing temporary is left.
    assert_ok(run_cli("--net", nets.uncond, "--outdir", tmp_path / "flat", *args))
    assert sorted(os.listdir(tmp_path / "flat")) == ["000998.png", "000999.png", "001000.png", "001001.png"]

    # The code-executing loader gives the same network.
    assert_ok(
        run_cli("--net", nets.uncond, "--outdir", tmp_path / "trusted", "--subdirs", "--trust-embedded-code", *args)
    )
    assert all(np.array_equal(v, ref[k]) for k, v in read_images(tmp_path / "trusted").items())


def test_sample_with_vae_encoder(vae_net, tmp_path, run_cli):
    assert_ok(run_cli("--net", vae_net, "--outdir", tmp_path / "out", "--seeds", "3,5", "--steps", 2))
    images = read_images(tmp_path / "out")
    assert list(images) == ["000003.png", "000005.png"]
    assert all(v.shape == (16, 16, 3) and v.dtype == np.uint8 for v in images.values())  # 8x8x4 latents, VAE x2
    assert not np.array_equal(images["000003.png"], images["000005.png"])


def test_library_iterable(nets):
    net = make_net(label_dim=4, seed=1).float().train()
    weights = [p.clone() for p in net.parameters()]
    image_iter = gi.generate_images(
        net, seeds=[5, 6, 7, 8, 9], max_batch_size=2, class_idx=3, num_steps=2, verbose=False, device="cpu"
    )
    assert len(image_iter) == 3
    results = list(image_iter)
    assert [r.batch_idx for r in results] == [0, 1, 2] and all(r.num_batches == 3 for r in results)
    assert [r.seeds for r in results] == [[5, 6], [7, 8], [9]]
    assert [list(r.indices) for r in results] == [[0, 1], [2, 3], [4]]
    for r in results:
        assert r.images.dtype == torch.uint8 and r.images.shape == (len(r.seeds), 3, 8, 8)
        assert r.noise.shape == (len(r.seeds), 3, 8, 8)
        assert torch.equal(r.labels, torch.eye(4)[[3] * len(r.seeds)])
    # The module ran in eval mode, so MPConv did not rewrite its weights; then its mode was restored.
    assert net.training and all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))


def test_caller_network_is_restored():
    net = make_net(label_dim=4, seed=1).float().train().requires_grad_(True)
    net.unet.out_gain.requires_grad_(False)
    net.unet.enc["8x8_block0"].eval()
    modes = [m.training for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    seen = []

    def sampler(net, noise, gnet, **kwargs):
        seen.append((net.training, any(p.requires_grad for p in net.parameters()), gnet is net))
        return noise

    for _ in gi.generate_images(net, seeds=[1, 2], sampler_fn=sampler, verbose=False, device="cpu"):
        pass
    assert seen == [(False, False, True)]  # sampled in eval mode, without gradients, guided by itself
    assert [m.training for m in net.modules()] == modes and [p.requires_grad for p in net.parameters()] == grads
    # Also when sampling fails midway.
    with pytest.raises(ZeroDivisionError):
        for _ in gi.generate_images(net, seeds=[1], sampler_fn=lambda **kwargs: 1 / 0, verbose=False, device="cpu"):
            pass
    assert [m.training for m in net.modules()] == modes and [p.requires_grad for p in net.parameters()] == grads


def test_no_guiding_network_means_self_guidance():
    # The reference guides with the main network when gnet is None: D_g = D, so guidance changes nothing.
    net = make_net(label_dim=4, seed=1)

    def run(**kwargs):
        return torch.cat(
            [
                r.images
                for r in gi.generate_images(net, seeds=[3, 4], num_steps=3, verbose=False, device="cpu", **kwargs)
            ]
        )

    unguided = run()
    assert torch.equal(run(guidance=2.5), unguided)
    assert torch.equal(run(gnet=net, guidance=2.5), unguided)
    assert not torch.equal(run(gnet=make_net(label_dim=4, seed=2), guidance=2.5), unguided)


def test_latent_network_needs_its_encoder():
    net = make_net(img_channels=4, seed=3)
    with pytest.raises(ValueError, match="4-channel latents.*StabilityVAEEncoder"):
        gi.generate_images(net, seeds=[0], verbose=False, device="cpu")
    with pytest.raises(ValueError, match="4-channel latents"):
        gi.generate_images(net, encoder=StandardRGBEncoder(), seeds=[0], verbose=False, device="cpu")


def test_bad_destination_fails_before_loading(run_cli, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/net.pkl"  # loading it would fail with "Cannot open"
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = run_cli("--net", url, "--outdir", blocker, "--steps", 2)
    assert_one_line_error(result, "Cannot create output directory", "--outdir", "it is a file")
    assert "Downloading" not in result.output and "Loading" not in result.output
    result = run_cli("--net", url, "--gnet", tmp_path / "missing.pkl", "--guidance", 2, "--outdir", tmp_path / "out")
    assert_one_line_error(result, "Cannot open network pickle", "--gnet", "does not exist")
    assert "Downloading" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_compiled_images_across_processes_match_eager_single_process(single_process_runs, nets, tmp_path):
    # Each process compiles its own graphs; a seed's image depends neither on that nor on its batch.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO_ROOT / "generate_images.py"), "--net", nets.cond, "--outdir", str(tmp_path / "out")]
    cmd += [*SEED_ARGS, "--batch", "3", "--compile"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "running eagerly instead" not in assert_torchrun_succeeded(proc)  # really compiled
    assert_images_close(read_images(tmp_path / "out"), single_process_runs["b8"].images)
