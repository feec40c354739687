"""The EDM2 network: exact sizes and names (as the reference builds it) and magnitude preservation in numbers."""

import copy

import numpy as np
import pytest
import torch

from training import networks_edm2 as N

# The reference's table: (model_channels, dropout, img_channels) -> parameters in millions, for all twelve presets.
PRESET_PARAMS = {
    "edm2-img512-xxs": (64, 0.0, 4, 31.31),
    "edm2-img512-xs": (128, 0.0, 4, 124.71),
    "edm2-img512-s": (192, 0.0, 4, 280.21),
    "edm2-img512-m": (256, 0.1, 4, 497.81),
    "edm2-img512-l": (320, 0.1, 4, 777.50),
    "edm2-img512-xl": (384, 0.1, 4, 1119.28),
    "edm2-img512-xxl": (448, 0.1, 4, 1523.16),
    "edm2-img64-xs": (128, 0.0, 3, 124.71),
    "edm2-img64-s": (192, 0.0, 3, 280.21),
    "edm2-img64-m": (256, 0.1, 3, 497.80),
    "edm2-img64-l": (320, 0.1, 3, 777.49),
    "edm2-img64-xl": (384, 0.1, 3, 1119.28),
}


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMS))
def test_preset_parameter_counts(preset):
    channels, dropout, img_channels, expected_m = PRESET_PARAMS[preset]
    with torch.device("meta"):
        net = N.Precond(
            img_resolution=64, img_channels=img_channels, label_dim=1000, model_channels=channels, dropout=dropout
        )
    count = sum(p.numel() for p in net.parameters())
    assert round(count / 1e6, 2) == pytest.approx(expected_m, abs=0.005)


def small_config(**overrides):
    kwargs = dict(
        img_resolution=16,
        img_channels=3,
        label_dim=10,
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
    )
    kwargs.update(overrides)
    return kwargs


def _block_keys(prefix, cin, cout, cemb, flavor, attention):
    # conv_res0 takes `out` channels in the encoder (after the skip projection) and `in` in the decoder.
    keys = [
        (f"{prefix}.emb_gain", ()),
        (f"{prefix}.conv_res0.weight", (cout, cout if flavor == "enc" else cin, 3, 3)),
        (f"{prefix}.emb_linear.weight", (cout, cemb)),
        (f"{prefix}.conv_res1.weight", (cout, cout, 3, 3)),
    ]
    if cin != cout:
        keys.append((f"{prefix}.conv_skip.weight", (cout, cin, 1, 1)))
    if attention:
        keys += [
            (f"{prefix}.attn_qkv.weight", (3 * cout, cout, 1, 1)),
            (f"{prefix}.attn_proj.weight", (cout, cout, 1, 1)),
        ]
    return keys


def test_state_dict_keys_and_shapes_small_config():
    # Written out from the reference architecture (EDM2 paper, appendix) for resolution 16, channel_mult [1,2] (cblock = [32, 64]), one block per
    # level, attention at 8x8 (64 channels = one head of 64), cnoise = 32, cemb = 64, 10 classes.
    e = 64
    expected = [
        ("unet.out_gain", ()),
        ("unet.emb_fourier.freqs", (32,)),
        ("unet.emb_fourier.phases", (32,)),
        ("unet.emb_noise.weight", (64, 32)),
        ("unet.emb_label.weight", (64, 10)),
        ("unet.enc.16x16_conv.weight", (32, 4, 3, 3)),
    ]
    expected += _block_keys("unet.enc.16x16_block0", 32, 32, e, "enc", False)
    expected += _block_keys("unet.enc.8x8_down", 32, 32, e, "enc", False)
    expected += _block_keys("unet.enc.8x8_block0", 32, 64, e, "enc", True)
    # Skip stack (encoder outputs): 32, 32, 32, 64. Decoder pops from the end.
    expected += _block_keys("unet.dec.8x8_in0", 64, 64, e, "dec", True)
    expected += _block_keys("unet.dec.8x8_in1", 64, 64, e, "dec", False)
    expected += _block_keys("unet.dec.8x8_block0", 64 + 64, 64, e, "dec", True)
    expected += _block_keys("unet.dec.8x8_block1", 64 + 32, 64, e, "dec", True)
    expected += _block_keys("unet.dec.16x16_up", 64, 64, e, "dec", False)
    expected += _block_keys("unet.dec.16x16_block0", 64 + 32, 32, e, "dec", False)
    expected += _block_keys("unet.dec.16x16_block1", 32 + 32, 32, e, "dec", False)
    expected += [
        ("unet.out_conv.weight", (3, 32, 3, 3)),
        ("logvar_fourier.freqs", (128,)),
        ("logvar_fourier.phases", (128,)),
        ("logvar_linear.weight", (1, 128)),
    ]
    net = N.Precond(**small_config())
    actual = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert actual == expected
    # Optional submodules that are absent are plain None attributes, not _modules entries (as in the reference).
    block = net.unet.enc["16x16_block0"]
    assert block.conv_skip is None and "conv_skip" in block.__dict__ and "conv_skip" not in block._modules
    assert N.Precond(**small_config(label_dim=0)).unet.emb_label is None


def test_init_args_recorded_as_spec():
    net = N.Precond(**small_config())
    assert net.init_args == () and net.init_kwargs == small_config()
    block = net.unet.enc["8x8_down"]
    assert block.init_args == (32, 32, 64) and dict(block.init_kwargs) == dict(flavor="enc", resample_mode="down")
    conv = net.unet.enc["16x16_conv"]
    assert conv.init_args == (4, 32) and dict(conv.init_kwargs) == dict(kernel=[3, 3])
    assert net.unet.emb_fourier.init_args == (32,)


def rms(x):
    return x.to(torch.float64).square().mean().sqrt().item()


def test_primitives_preserve_magnitude():
    torch.manual_seed(0)
    a = torch.randn(64, 256, 8, 8)
    b = torch.randn(64, 128, 8, 8)
    for t in (0.3, 0.5, 0.8):
        assert rms(N.mp_sum(a, torch.randn_like(a), t=t)) == pytest.approx(1, rel=0.05)
        assert rms(N.mp_cat(a, b, t=t)) == pytest.approx(1, rel=0.05)
    assert rms(N.mp_silu(a)) == pytest.approx(1, rel=0.05)
    # normalize: every slice has unit RMS, exactly up to eps.
    y = N.normalize(a * 7.0)
    per_slice = y.square().mean(dim=[1, 2, 3]).sqrt()
    assert torch.allclose(per_slice, torch.ones(64), atol=1e-4)
    # Fourier features: unit RMS over random inputs.
    assert rms(N.MPFourier(512)(torch.randn(256))) == pytest.approx(1, rel=0.05)


def test_mp_cat_matches_formula():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    t = 0.3
    C = np.sqrt((3 + 5) / ((1 - t) ** 2 + t**2))
    expected = torch.cat([a * (C / np.sqrt(3) * (1 - t)), b * (C / np.sqrt(5) * t)], dim=1)
    assert torch.allclose(N.mp_cat(a, b, t=t), expected)


def test_resample_down_is_average_and_up_is_nearest():
    x = torch.randn(2, 3, 8, 8)
    down = N.resample(x, mode="down")
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    up = N.resample(x, mode="up")
    assert torch.allclose(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), atol=1e-6)
    assert N.resample(x, mode="keep") is x


def test_mpconv_and_block_preserve_magnitude():
    torch.manual_seed(1)
    conv = N.MPConv(128, 256, kernel=[3, 3]).eval()
    linear = N.MPConv(512, 256, kernel=[]).eval()
    with torch.no_grad():
        # Unit-variance input, white across channels: output RMS is 1 in expectation.
        assert rms(conv(torch.randn(16, 128, 16, 16))) == pytest.approx(1, rel=0.05)
        assert rms(linear(torch.randn(256, 512))) == pytest.approx(1, rel=0.05)
        # (Attention is left out: softmax-averaging random, uncorrelated values shrinks them by design.)
        for flavor, cin, mode in (("enc", 128, "keep"), ("enc", 64, "down"), ("dec", 256, "keep"), ("dec", 128, "up")):
            block = N.Block(cin, 128, 256, flavor=flavor, resample_mode=mode).eval()
            out = block(torch.randn(8, cin, 16, 16), torch.randn(8, 256))
            assert rms(out) == pytest.approx(1, rel=0.05)


def test_training_forward_normalises_weights_and_eval_leaves_them():
    torch.manual_seed(2)
    net = N.Precond(**small_config())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # Start far from unit norm.
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.full([2], 1.5), torch.eye(10)[:2]
    before = copy.deepcopy(net.state_dict())
    net.eval()
    with torch.no_grad():
        net(x, sigma, labels)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # Eval mode never writes the weights.
    net.train()
    net(x, sigma, labels, return_logvar=True)[0].sum().backward()
    convs = [m for m in net.modules() if isinstance(m, N.MPConv)]
    assert len(convs) == sum(k.endswith(".weight") for k in net.state_dict())
    for m in convs:
        w = m.weight.detach().reshape(m.weight.shape[0], -1).to(torch.float64)
        per_channel_rms = w.square().mean(dim=1).sqrt()
        assert torch.allclose(per_channel_rms, torch.ones_like(per_channel_rms), atol=1e-3)


def test_precond_matches_formula_and_handles_labels():
    torch.manual_seed(3)
    net = N.Precond(**small_config()).eval()
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 20.0])
    labels = torch.eye(10)[[1, 4, 7]]
    with torch.no_grad():
        D, logvar = net(x, sigma, labels, return_logvar=True)
        s = sigma.reshape(-1, 1, 1, 1)
        sd = 0.5
        F = net.unet((x / (sd**2 + s**2).sqrt()), sigma.log() / 4, labels)
        expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * F
        assert torch.allclose(D, expected, atol=1e-5)
        assert logvar.shape == (3, 1, 1, 1)
        # Missing labels mean the zero label, broadcast over the batch.
        assert torch.allclose(net(x, sigma), net(x, sigma, torch.zeros(3, 10)), atol=1e-6)
        # A scalar sigma applies to the whole batch.
        assert torch.allclose(net(x, torch.tensor(1.0), labels), net(x, torch.ones(3), labels), atol=1e-6)


def test_eval_forward_reads_the_current_weights():
    # No hidden state between calls: an edit made through .data (which bypasses the version
    # counter) or in place is seen by the very next call, exactly as a freshly computed output.
    torch.manual_seed(4)
    net = N.Precond(**small_config()).eval()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.full([2], 0.7), torch.eye(10)[:2]
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        before = net(x, sigma, labels)
        net.unet.out_conv.weight.data.mul_(-1)
        after = net(x, sigma, labels)
    fresh = copy.deepcopy(net)
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(x, sigma, labels), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-2


def test_network_built_under_inference_mode_runs_repeatedly():
    with torch.inference_mode():
        torch.manual_seed(5)
        net = N.Precond(**small_config()).eval()
        x, sigma, labels = torch.randn(2, 3, 16, 16), torch.full([2], 0.7), torch.eye(10)[:2]
        first = net(x, sigma, labels)
        second = net(x, sigma, labels)
    with torch.no_grad():
        third = net(x, sigma, labels)  # and outside inference mode, as a sampler may call it
    assert torch.equal(first, second) and torch.equal(first, third)
