"""count_flops.py: hand-derived flop totals, the paper's preset table, memory, pickles, URLs, errors.

The expected totals below are derived by hand from the counting conventions of count_flops.py applied
to the forward passes of training/networks_edm2.py, op by op, and written as formulas; they are never read back from the
code under test. Conventions used (per output element unless said otherwise):

    conv        output elements × (product of weight dims after the first)
    matmul      output elements × inner dimension (einsums are batched matmuls)
    vector norm *input* elements
    silu 3, softmax 3, lerp 2, clamp 2, other element-wise ops 1
    views, copies, casts, cat, creation ops 0
"""

import pickle
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import count_flops as cf
import dnnlib
from tests.conftest import REPO_ROOT, subprocess_env
from training import networks_edm2 as net_module

# ----------------------------------------------------------------------------
# Hand derivations.


def mpconv_flops(cin: int, cout: int, k: int, hw: int, tensor_gain: bool = False) -> int:
    """MPConv in eval mode on [1, cin, H, W] (hw = H·W), or on [1, cin] when k == 0.

    Weight path, on the weight's n = cout·cin·k² elements (k² → 1 for a linear layer):
      normalize(w):   vector_norm n (input elements) + add(eps, norm, alpha) cout + div n
      w * (gain / sqrt(fan_in)):  mul n, plus 1 for the 0-dim division when gain is a tensor
      cast to x's dtype: free
    Data path:
      conv2d:  output cout·hw × weight dims after the first cin·k²
      linear:  x @ w.t(): output cout × inner cin   (t() is a view)
    """
    n = cout * cin * max(k, 1) ** 2
    weight = n + cout + n + n + (1 if tensor_gain else 0)
    data = cout * hw * cin * k * k if k else cout * cin
    return weight + data


def block_flops(cin: int, cout: int, emb: int, hw_in: int, flavor: str, resample: str = "keep", heads: int = 0) -> int:
    """Block.forward in eval mode on x [1, cin, H, W] with hw_in = H·W, emb [1, emb]."""
    C = cout
    total = 0
    # 1. resample: 'down' = depthwise conv, weight [cin, 1, 2, 2] -> 4 per output element;
    #    'up' = f * 4 on the 2×2 filter (4 muls), then the depthwise transposed conv with weight
    #    [cin, 1, 2, 2]: output elements × 4 (the convolution rule: output × weight dims after the first).
    hw = hw_in
    if resample == "down":
        hw = hw_in // 4
        total += cin * hw * 4
    elif resample == "up":
        hw = hw_in * 4
        total += 4 + cin * hw * 4
    skip = mpconv_flops(cin, C, 1, hw) if cin != C else 0
    # 2. enc: conv_skip, then pixel norm over channels: vector_norm C·hw (input) + add hw + div C·hw.
    if flavor == "enc":
        total += skip + C * hw + hw + C * hw
    x_channels = C if flavor == "enc" else cin
    # 3. residual branch:
    #    mp_silu(x) = silu (3) + div by 0.596 (1)      -> 4 per element of x
    #    conv_res0                                      -> MPConv(x_channels, C, 3×3), gain 1
    #    emb_linear(emb, gain=emb_gain)                 -> MPConv(emb, C, linear), 0-dim tensor gain
    #    + 1                                            -> C
    #    y * c                                          -> C·hw
    #    mp_silu(y)                                     -> 4·C·hw
    #    conv_res1                                      -> MPConv(C, C, 3×3)
    total += 4 * x_channels * hw
    total += mpconv_flops(x_channels, C, 3, hw)
    total += mpconv_flops(emb, C, 0, 1, tensor_gain=True) + C
    total += C * hw + 4 * C * hw
    total += mpconv_flops(C, C, 3, hw)
    # 4. dec: conv_skip after the residual branch.
    if flavor == "dec":
        total += skip
    # 5. mp_sum = lerp (2) + division by the constant (1) -> 3 per element.
    total += 3 * C * hw
    # 6. attention with `heads` heads of c = C/heads channels over L = hw positions:
    #    attn_qkv: MPConv(C, 3C, 1×1)
    #    normalize(y, dim=2) on [1, heads, c, 3, L]: vector_norm 3C·L + add 3·heads·L + div 3C·L
    #    k / sqrt(c): C·L
    #    einsum q·k -> bmm, output heads·L·L, inner c      = C·L²
    #    softmax over keys: 3·heads·L²
    #    einsum w·v -> bmm, output heads·c·L, inner L      = C·L²
    #    attn_proj: MPConv(C, C, 1×1); mp_sum: 3·C·L
    if heads:
        L = hw
        total += mpconv_flops(C, 3 * C, 1, L)
        total += 3 * C * L + 3 * heads * L + 3 * C * L
        total += C * L
        total += C * L * L + 3 * heads * L * L + C * L * L
        total += mpconv_flops(C, C, 1, L) + 3 * C * L
    # 7. clip_ to ±clip_act: clamp, 2 per element.
    total += 2 * C * hw
    return total


def two_level_precond_flops() -> int:
    """Precond(img_resolution=8, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1,2],
    num_blocks=1, attn_resolutions=[4], channels_per_head=16), derived from UNet and Precond.

    cblock = [16, 32], cnoise = 16, cemb = 32. Heads at 4×4 with 32 channels: 32/16 = 2.
    """
    img, res, labels, E, Cn = 3, 8, 10, 32, 16
    hw8, hw4 = 8 * 8, 4 * 4
    total = 0
    # Precond (σ tensors have one element):
    #   c_skip = σd²/(σ²+σd²):  pow, add, reciprocal, mul (scalar / tensor = reciprocal · scalar)   4
    #   c_out = σ·σd/sqrt(σ²+σd²): mul, pow, add, sqrt, div                                        5
    #   c_in = 1/sqrt(σd²+σ²): pow, add, sqrt, reciprocal, mul                                     5
    #   c_noise = log(σ)/4: log, div                                                               2
    #   c_in·x: img·hw8;  D = c_skip·x + c_out·F: 3·img·hw8
    total += 4 + 5 + 5 + 2 + img * hw8 + 3 * img * hw8
    # UNet embedding:
    #   MPFourier: outer (a mul) Cn, + phases Cn, cos Cn, · sqrt(2) Cn                       4·Cn
    #   emb_noise = MPConv(Cn, E) linear, gain 1; labels · sqrt(10): 10
    #   emb_label = MPConv(10, E) linear; mp_sum 3·E; mp_silu 4·E
    total += 4 * Cn + mpconv_flops(Cn, E, 0, 1) + labels + mpconv_flops(labels, E, 0, 1) + 3 * E + 4 * E
    # Encoder (the ones channel comes from ones_like + cat: free):
    total += mpconv_flops(img + 1, 16, 3, hw8)  # 8x8_conv
    total += block_flops(16, 16, E, hw8, "enc")  # 8x8_block0
    total += block_flops(16, 16, E, hw8, "enc", resample="down")  # 4x4_down
    total += block_flops(16, 32, E, hw4, "enc", heads=2)  # 4x4_block0 (attention at 4)
    # Decoder; skips (encoder outputs) = [16@8, 16@8, 16@4, 32@4]. mp_cat scales both parts: one
    # mul per element of each, i.e. (Na + Nb)·hw.
    total += block_flops(32, 32, E, hw4, "dec", heads=2)  # 4x4_in0 (always attention)
    total += block_flops(32, 32, E, hw4, "dec")  # 4x4_in1
    total += (32 + 32) * hw4 + block_flops(64, 32, E, hw4, "dec", heads=2)  # 4x4_block0
    total += (32 + 16) * hw4 + block_flops(48, 32, E, hw4, "dec", heads=2)  # 4x4_block1
    total += block_flops(32, 32, E, hw4, "dec", resample="up")  # 8x8_up
    total += (32 + 16) * hw8 + block_flops(48, 16, E, hw8, "dec")  # 8x8_block0
    total += (16 + 16) * hw8 + block_flops(32, 16, E, hw8, "dec")  # 8x8_block1
    # out_conv = MPConv(16, 3, 3×3) with gain=out_gain (a 0-dim tensor).
    total += mpconv_flops(16, img, 3, hw8, tensor_gain=True)
    assert res == 8
    return total


TWO_LEVEL_KWARGS = dict(
    img_resolution=8,
    img_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=16,
)


def two_level_params() -> int:
    """Parameter count of the same network: every MPConv weight plus the scalar gains."""

    def conv(cin, cout, k):
        return cout * cin * max(k, 1) ** 2

    def block(cin, cout, flavor, heads=0):
        n = 1 + conv(cout if flavor == "enc" else cin, cout, 3) + conv(32, cout, 0) + conv(cout, cout, 3)
        n += conv(cin, cout, 1) if cin != cout else 0
        n += conv(cout, 3 * cout, 1) + conv(cout, cout, 1) if heads else 0
        return n

    n = 1 + conv(16, 32, 0) + conv(10, 32, 0) + conv(4, 16, 3)  # out_gain, emb_noise, emb_label, 8x8_conv
    n += block(16, 16, "enc") + block(16, 16, "enc") + block(16, 32, "enc", heads=2)
    n += block(32, 32, "dec", 2) + block(32, 32, "dec") + block(64, 32, "dec", 2) + block(48, 32, "dec", 2)
    n += block(32, 32, "dec") + block(48, 16, "dec") + block(32, 16, "dec")
    n += conv(16, 3, 3) + conv(128, 1, 0)  # out_conv, logvar_linear
    return n


# ----------------------------------------------------------------------------
# Small configurations equal their hand-derived totals.


@pytest.mark.slow
def test_one_mpconv_layer():
    torch.manual_seed(0)
    conv = net_module.MPConv(4, 8, kernel=[3, 3])
    result = cf.count_flops(conv, device="cpu", net_args=(torch.randn(1, 4, 8, 8),))
    # Weight path 3·(8·4·9) + 8 = 872; conv 8·64 outputs × 4·9 = 18432.
    assert result.flops == 3 * 8 * 4 * 9 + 8 + 8 * 64 * 36 == mpconv_flops(4, 8, 3, 64) == 19304
    assert result.params == 8 * 4 * 9
    assert result.unknown == {}

    linear = net_module.MPConv(12, 5, kernel=[])
    result = cf.count_flops(linear, device="cpu", net_args=(torch.randn(1, 12),))
    assert result.flops == 4 * 5 * 12 + 5 == mpconv_flops(12, 5, 0, 1)


def test_reference_signature_and_fields(capsys):
    # count_flops(net, net_args=None, net_kwargs={}, verbose=True, device=...), as the reference's.
    torch.manual_seed(0)
    net = net_module.Precond(**TWO_LEVEL_KWARGS)
    result = cf.count_flops(net, None, {}, True, "cpu")
    assert "Gflops per sample:" in capsys.readouterr().out  # verbose prints the report
    assert result.total_params == two_level_params() and result.total_flops == two_level_precond_flops()
    assert result.mem_per_sample == result.memory_bytes > 0
    assert result.op_flops["convolution"] == result.ops["convolution"].flops
    assert sum(result.op_flops.values()) == result.total_flops and result.op_count["bmm"] == 4 * 2
    # Keyword arguments of the pass go through net_kwargs.
    x, sigma, labels = torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, 10)
    by_kwargs = cf.count_flops(net, net_args=(x, sigma), net_kwargs=dict(class_labels=labels), verbose=False)
    assert by_kwargs.total_flops == result.total_flops
    assert capsys.readouterr().out == ""


def test_mpconv_counts_per_sample():
    conv = net_module.MPConv(4, 8, kernel=[3, 3])
    # Batch of 4: the weight path runs once, the conv four times; totals are per sample.
    result = cf.count_flops(conv, device="cpu", net_args=(torch.randn(4, 4, 8, 8),))
    assert result.flops == (3 * 8 * 4 * 9 + 8 + 4 * 8 * 64 * 36) // 4


def test_block_without_attention():
    # enc flavour, 8 -> 16 channels (so conv_skip is used), downsampling 8×8 -> 4×4.
    block = net_module.Block(8, 16, 24, flavor="enc", resample_mode="down")
    result = cf.count_flops(block, device="cpu", net_args=(torch.randn(1, 8, 8, 8), torch.randn(1, 24)))
    assert result.flops == block_flops(8, 16, 24, 64, "enc", resample="down")
    assert result.unknown == {}


def test_block_with_attention():
    # dec flavour, 24 -> 16 channels (conv_skip after the residual), 16/8 = 2 heads at 4×4.
    block = net_module.Block(24, 16, 20, flavor="dec", attention=True, channels_per_head=8)
    result = cf.count_flops(block, device="cpu", net_args=(torch.randn(1, 24, 4, 4), torch.randn(1, 20)))
    assert result.flops == block_flops(24, 16, 20, 16, "dec", heads=2)
    assert result.ops["bmm"].flops == 2 * 16 * 16 * 16  # the two einsums: 2 · C·L², C=16, L=16
    assert result.ops["_softmax"].flops == 3 * 2 * 16 * 16
    # Upsampling block: the transposed-conv convention (output elements × 1·2·2).
    block = net_module.Block(16, 16, 20, flavor="dec", resample_mode="up")
    result = cf.count_flops(block, device="cpu", net_args=(torch.randn(1, 16, 4, 4), torch.randn(1, 20)))
    assert result.flops == block_flops(16, 16, 20, 16, "dec", resample="up")


@pytest.mark.slow
def test_two_level_unet():
    torch.manual_seed(0)
    net = net_module.Precond(**TWO_LEVEL_KWARGS)
    result = cf.count_flops(net, device="cpu")
    assert result.flops == two_level_precond_flops()
    assert result.params == two_level_params()
    assert result.unknown == {}
    # The meta device (no arithmetic) sees exactly the same ops, and tracks the same memory. (The
    # second meta pass is compared: the first may also create misc.constant's cached resampling
    # filter on the meta device, 16 bytes that live on in the cache.)
    cf.count_flops(net.to("meta"), device="meta")
    meta = cf.count_flops(net.to("meta"), device="meta")
    assert (meta.flops, meta.params, meta.memory_bytes) == (result.flops, result.params, result.memory_bytes)


# ----------------------------------------------------------------------------
# The paper's preset table (params to 0.01 M, Gflops to 0.01), on the meta device.


@pytest.mark.parametrize(
    "preset,params_m,gflops",
    [
        ("edm2-img512-xs", 124.71, 45.50),
        ("edm2-img64-xs", 124.71, 45.49),
    ],
)
@pytest.mark.slow
def test_preset_matches_spec_table(preset, params_m, gflops):
    result = cf.count_flops(cf.build_preset_network(preset, device="meta"))
    assert round(result.params / 1e6, 2) == params_m
    assert round(result.gflops, 2) == gflops
    assert result.unknown == {}


def test_preset_kwargs_follow_spec_table():
    assert len(cf.PRESETS) == 12
    xs = cf.PRESETS["edm2-img512-xs"]
    assert (xs["img_resolution"], xs["img_channels"], xs["label_dim"], xs["model_channels"], xs["dropout"]) == (
        64,
        4,
        1000,
        128,
        0.0,
    )
    m = cf.PRESETS["edm2-img64-m"]
    assert (m["img_channels"], m["model_channels"], m["dropout"]) == (3, 256, 0.1)
    assert cf.PRESETS["edm2-img512-xxl"]["model_channels"] == 448


# ----------------------------------------------------------------------------
# Memory and unknown ops, on a module whose allocations are known.


class _Toy(torch.nn.Module):
    img_channels, img_resolution, label_dim = 1, 4, 0

    def __init__(self, unknown_op: bool = False):
        super().__init__()
        self.unknown_op = unknown_op
        self.scale = torch.nn.Parameter(torch.ones([]))

    def forward(self, x, sigma, labels):
        big = x.expand(1, 8, 4, 4) * 3  # new: 8·16 float32 = 512 bytes (the expand is a view of x)
        small = big[:, :1] + 1  # new: 64 bytes -> 576 live, the peak
        del big  # 64 live
        out = torch.cat([small] * 4, dim=1)  # new: 256 bytes -> 320 live
        if self.unknown_op:
            out = out.cumsum(dim=1)  # not covered by the conventions: listed, counted 0
        return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_memory_is_peak_of_live_allocations(device):
    result = cf.count_flops(_Toy(), device=device)
    assert result.memory_bytes == 512 + 64
    assert result.flops == 8 * 16 + 16  # mul + add; expand, slice and cat are free


def test_unknown_ops_are_listed_and_counted_zero():
    result = cf.count_flops(_Toy(unknown_op=True), device="cpu")
    assert result.unknown == {"cumsum": 1}
    assert result.flops == 8 * 16 + 16
    report = cf.format_report(result)
    assert "Unknown ops (counted 0): cumsum" in report
    assert re.search(r"^cumsum\s+1\s+0\.0000\s+0\.00%\s+\(unknown op, counted 0\)$", report, re.M)


def test_counting_leaves_settings_and_mode_as_they_were():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    toy = _Toy().train()
    cf.count_flops(toy, device="cpu")
    assert toy.training and toy.scale.requires_grad
    assert (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    ) == before


def test_second_count_sees_every_op():
    # A network that was already run (in eval mode, without autograd) counts the same: no state
    # carried between calls (such as a cached normalised weight) may hide the weight path.
    net = net_module.Precond(**TWO_LEVEL_KWARGS).eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, 8, 8), torch.ones(1), torch.zeros(1, 10))  # fills the cache, if enabled
    assert cf.count_flops(net, device="cpu").flops == two_level_precond_flops()


# ----------------------------------------------------------------------------
# Pickles written by this project, URLs, and files that are not network pickles.


def _write_snapshot(path) -> None:
    from training.encoders import StandardRGBEncoder

    torch.manual_seed(0)
    net = net_module.Precond(**TWO_LEVEL_KWARGS).eval().requires_grad_(False).to(torch.float16)
    data = dnnlib.EasyDict(
        encoder=StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="data.zip", use_labels=True
        ),
        loss_fn=None,
        ema=net,
    )
    with open(path, "wb") as f:
        pickle.dump(data, f)


def _printed_totals(output: str) -> tuple:
    params = int(re.search(r"^Parameters:\s+[\d.]+ M \((\d+) parameters\)$", output, re.M).group(1))
    flops = int(re.search(r"^Gflops per sample:\s+[\d.]+ \((\d+) flops\)$", output, re.M).group(1))
    memory = float(re.search(r"^Memory per sample:\s+([\d.]+) MiB", output, re.M).group(1))
    return params, flops, memory


def test_cli_counts_a_project_pickle(tmp_path):
    path = tmp_path / "network-snapshot-0000000-0.100.pkl"
    _write_snapshot(path)
    result = CliRunner().invoke(cf.main, [str(path), "--device=cpu"])
    assert result.exit_code == 0, result.output
    params, flops, memory = _printed_totals(result.output)
    assert (params, flops) == (two_level_params(), two_level_precond_flops())
    assert memory > 0
    assert re.search(r"^convolution\s+\d+\s", result.output, re.M)  # the per-op table
    # The trusting loader runs the pickle's embedded copy of the network module instead.
    result = CliRunner().invoke(cf.main, [str(path), "--device=cpu", "--trust-embedded-code"])
    assert result.exit_code == 0, result.output
    assert _printed_totals(result.output)[:2] == (two_level_params(), two_level_precond_flops())


@pytest.mark.slow
def test_cli_counts_a_url(tmp_path, http_server, cache_dir):
    path = tmp_path / "net.pkl"
    _write_snapshot(path)
    http_server.routes["/models/net.pkl"] = path.read_bytes()
    result = CliRunner().invoke(cf.main, [http_server.url("/models/net.pkl")])  # default device (meta here)
    assert result.exit_code == 0, result.output
    assert _printed_totals(result.output)[:2] == (two_level_params(), two_level_precond_flops())
    assert http_server.requests == ["/models/net.pkl"]


@pytest.mark.slow
def test_cli_counts_a_preset():
    result = CliRunner().invoke(cf.main, ["edm2-img64-xs"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^Parameters:\s+124\.71 M", result.output, re.M)
    assert re.search(r"^Gflops per sample:\s+45\.49 ", result.output, re.M)


def _one_line_error(args) -> str:
    result = CliRunner().invoke(cf.main, args)
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def test_cli_rejects_files_that_are_not_network_pickles(tmp_path):
    garbage = tmp_path / "image.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert "is not a network pickle" in _one_line_error([str(garbage)])

    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    assert "is not a network pickle" in _one_line_error([str(empty)])

    no_ema = tmp_path / "dict.pkl"
    no_ema.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    assert "no 'ema' network" in _one_line_error([str(no_ema)])

    unsafe = tmp_path / "unsafe.pkl"
    unsafe.write_bytes(pickle.dumps({"ema": pickle.loads}))  # a global the safe loader refuses
    assert "pickle.loads" in _one_line_error([str(unsafe)])

    assert "not a network pickle, a URL or a training preset" in _one_line_error([str(tmp_path / "missing.pkl")])
    assert "edm2-img512-xs" in _one_line_error(["edm2-img512-huge"])


def test_cli_refuses_to_be_one_of_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for each process it starts
    monkeypatch.setenv("RANK", "0")
    line = _one_line_error(["edm2-img64-xs"])
    assert "single process" in line and "torchrun" in line
    monkeypatch.setenv("RANK", "1")  # the other ranks exit quietly, so the message shows once
    result = CliRunner().invoke(cf.main, ["edm2-img64-xs"])
    assert result.exit_code == 1 and result.output == ""


@pytest.mark.slow
def test_refuses_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO_ROOT / "count_flops.py"), "edm2-img64-xs"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert len(re.findall(r"^Error: count_flops.py runs as a single process", output, re.M)) == 1, output
    assert "Parameters:" not in output and 'count_flops.py", line' not in output, output  # no report, no traceback
