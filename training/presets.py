"""Training presets: the paper's training configurations and the CPU-scale presets.

``config_presets`` maps a preset name to the options it sets (train_edm2.py's option names);
``preset_network_kwargs`` turns one into the network's construction arguments. ``train_edm2.py``
resolves the options, ``count_flops.py`` sizes the networks; both read this one table.
"""

import copy
from typing import Optional

import dnnlib

# ----------------------------------------------------------------------------
# The one table of training presets (train_edm2.py --preset, count_flops.py and the help text).
#
# The paper's presets (its training configurations) set the duration, batch, model width,
# learning rate and decay, dropout and the noise distribution; the network keeps the paper's
# architecture (channel_mult [1,2,3,4], num_blocks 3, attention at 16x16 and 8x8).
#
# The CPU presets go further, because the paper's recipe does not scale down by width alone (a
# 64-channel XXS model still has 31M parameters): a narrow, shallow network (~0.3M parameters) with
# attention only at 4x4 (16 channels per head, so that these blocks have heads); the pixel-space
# noise distribution P_mean -0.8 / P_std 1.6, because small batches rarely draw the high noise
# levels that sampling starts from with -0.4 / 1.0; the learning-rate ramp-up and decay scaled down
# to a run of a few minutes on two cores; frequent status lines, snapshots and checkpoints. The
# README ("CPU-scale presets") tabulates them.

# fmt: off
config_presets = {
    'edm2-img512-xxs':  dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=64,  lr=0.0170, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-img512-xs':   dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=128, lr=0.0120, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-img512-s':    dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=192, lr=0.0100, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-img512-m':    dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=256, lr=0.0090, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img512-l':    dnnlib.EasyDict(duration=1792 << 20, batch=2048, channels=320, lr=0.0080, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img512-xl':   dnnlib.EasyDict(duration=1280 << 20, batch=2048, channels=384, lr=0.0070, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img512-xxl':  dnnlib.EasyDict(duration=896 << 20,  batch=2048, channels=448, lr=0.0065, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0),
    'edm2-img64-xs':    dnnlib.EasyDict(duration=1024 << 20, batch=2048, channels=128, lr=0.0120, decay=35000, dropout=0.00, P_mean=-0.8, P_std=1.6),
    'edm2-img64-s':     dnnlib.EasyDict(duration=1024 << 20, batch=2048, channels=192, lr=0.0100, decay=35000, dropout=0.00, P_mean=-0.8, P_std=1.6),
    'edm2-img64-m':     dnnlib.EasyDict(duration=2048 << 20, batch=2048, channels=256, lr=0.0090, decay=35000, dropout=0.10, P_mean=-0.8, P_std=1.6),
    'edm2-img64-l':     dnnlib.EasyDict(duration=1024 << 20, batch=2048, channels=320, lr=0.0080, decay=35000, dropout=0.10, P_mean=-0.8, P_std=1.6),
    'edm2-img64-xl':    dnnlib.EasyDict(duration=640 << 20,  batch=2048, channels=384, lr=0.0070, decay=35000, dropout=0.10, P_mean=-0.8, P_std=1.6),

    # CPU scale (see above). cpu-16 suits 16x16 data such as scikit-learn's digits upscaled;
    # cpu-32 suits 32x32 data such as Fashion-MNIST padded to 32x32.
    'cpu-16':           dnnlib.EasyDict(duration=64 << 10,   batch=64,   channels=16,  lr=0.0100, decay=1000,  dropout=0.00, P_mean=-0.8, P_std=1.6,
                                        channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, rampup=4 << 10,
                                        status=4 << 10, snapshot=16 << 10, checkpoint=16 << 10),
    'cpu-32':           dnnlib.EasyDict(duration=32 << 10,   batch=32,   channels=16,  lr=0.0100, decay=500,   dropout=0.00, P_mean=-0.8, P_std=1.6,
                                        channel_mult=[1, 2, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, rampup=2 << 10,
                                        status=2 << 10, snapshot=8 << 10, checkpoint=8 << 10),
}
# fmt: on

# Defaults of the options that a preset may also set.
io_defaults = dict(status=128 << 10, snapshot=8 << 20, checkpoint=128 << 20)

# Network options that only the CPU presets set (the paper's presets keep the UNet defaults).
_ARCH_KEYS = ["channel_mult", "num_blocks", "attn_resolutions", "channels_per_head"]


def is_cpu_preset(name: str) -> bool:
    return name.startswith("cpu-")


def preset_network_kwargs(
    preset: str, channels: Optional[int] = None, dropout: Optional[float] = None, use_fp16: Optional[bool] = None
) -> dnnlib.EasyDict:
    """The ``network_kwargs`` that a preset trains (None = the preset's value; use_fp16 None = unset)."""
    p = config_presets[preset]
    kwargs = dnnlib.EasyDict(
        class_name="training.networks_edm2.Precond",
        model_channels=(p.channels if channels is None else channels),
        dropout=(p.dropout if dropout is None else dropout),
    )
    if use_fp16 is not None:
        kwargs.use_fp16 = use_fp16
    kwargs.update({key: copy.deepcopy(p[key]) for key in _ARCH_KEYS if key in p})
    return kwargs
