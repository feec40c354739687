"""Generate images with a trained EDM2 model: presets and the command line over ``training.sampling``.

The sampler, the per-seed generators and ``generate_images()`` live in ``training/sampling.py``; this
script re-exports them, so that scripts written against the reference
(``from generate_images import generate_images, edm_sampler, StackedRandomGenerator``) keep working.
"""

from typing import Any, Optional

import click
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import cli
from training.cli import sampling_options
from training.sampling import (  # noqa: F401 -- re-exported: the names of the reference's generate_images.py
    SAMPLERS,
    StackedRandomGenerator,
    count_evaluations,
    dpmpp_2m_sampler,
    edm_sampler,
    edm_time_steps,
    euler_sampler,
    generate_images,
    image_path,
    load_network_pickle,
    parse_guidance_interval,
    parse_int_list,
    save_image,
)

# ----------------------------------------------------------------------------
# Configuration presets: the published post-hoc reconstructions and the
# guidance settings of the two papers. The comment is the published metric.

model_root = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"


def _preset(net: str, gnet: Optional[str] = None, guidance: Optional[float] = None) -> dnnlib.EasyDict:
    preset = dnnlib.EasyDict(net=f"{model_root}/{net}.pkl")
    if gnet is not None:
        preset.gnet = f"{model_root}/{gnet}.pkl"
        preset.guidance = guidance
    return preset


# fmt: off
config_presets = {
    # EDM2 paper, Table 2 (no guidance).
    'edm2-img512-xs-fid':              _preset('edm2-img512-xs-2147483-0.135'),   # fid = 3.53
    'edm2-img512-xs-dino':             _preset('edm2-img512-xs-2147483-0.200'),   # fd_dinov2 = 103.39
    'edm2-img512-s-fid':               _preset('edm2-img512-s-2147483-0.130'),    # fid = 2.56
    'edm2-img512-s-dino':              _preset('edm2-img512-s-2147483-0.190'),    # fd_dinov2 = 68.64
    'edm2-img512-m-fid':               _preset('edm2-img512-m-2147483-0.100'),    # fid = 2.25
    'edm2-img512-m-dino':              _preset('edm2-img512-m-2147483-0.155'),    # fd_dinov2 = 58.44
    'edm2-img512-l-fid':               _preset('edm2-img512-l-1879048-0.085'),    # fid = 2.06
    'edm2-img512-l-dino':              _preset('edm2-img512-l-1879048-0.155'),    # fd_dinov2 = 52.25
    'edm2-img512-xl-fid':              _preset('edm2-img512-xl-1342177-0.085'),   # fid = 1.96
    'edm2-img512-xl-dino':             _preset('edm2-img512-xl-1342177-0.155'),   # fd_dinov2 = 45.96
    'edm2-img512-xxl-fid':             _preset('edm2-img512-xxl-0939524-0.070'),  # fid = 1.91
    'edm2-img512-xxl-dino':            _preset('edm2-img512-xxl-0939524-0.150'),  # fd_dinov2 = 42.84
    'edm2-img64-s-fid':                _preset('edm2-img64-s-1073741-0.075'),     # fid = 1.58
    'edm2-img64-m-fid':                _preset('edm2-img64-m-2147483-0.060'),     # fid = 1.43
    'edm2-img64-l-fid':                _preset('edm2-img64-l-1073741-0.040'),     # fid = 1.33
    'edm2-img64-xl-fid':               _preset('edm2-img64-xl-0671088-0.040'),    # fid = 1.33

    # EDM2 paper, Table 3 (classifier-free guidance by an unconditional XS model).
    'edm2-img512-xs-guid-fid':         _preset('edm2-img512-xs-2147483-0.045', 'edm2-img512-xs-uncond-2147483-0.045', 1.40),  # fid = 2.91
    'edm2-img512-xs-guid-dino':        _preset('edm2-img512-xs-2147483-0.150', 'edm2-img512-xs-uncond-2147483-0.150', 1.70),  # fd_dinov2 = 79.94
    'edm2-img512-s-guid-fid':          _preset('edm2-img512-s-2147483-0.025', 'edm2-img512-xs-uncond-2147483-0.025', 1.40),   # fid = 2.23
    'edm2-img512-s-guid-dino':         _preset('edm2-img512-s-2147483-0.085', 'edm2-img512-xs-uncond-2147483-0.085', 1.90),   # fd_dinov2 = 52.32
    'edm2-img512-m-guid-fid':          _preset('edm2-img512-m-2147483-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.20),   # fid = 2.01
    'edm2-img512-m-guid-dino':         _preset('edm2-img512-m-2147483-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 2.00),   # fd_dinov2 = 41.98
    'edm2-img512-l-guid-fid':          _preset('edm2-img512-l-1879048-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),   # fid = 1.88
    'edm2-img512-l-guid-dino':         _preset('edm2-img512-l-1879048-0.035', 'edm2-img512-xs-uncond-2147483-0.035', 1.70),   # fd_dinov2 = 38.20
    'edm2-img512-xl-guid-fid':         _preset('edm2-img512-xl-1342177-0.020', 'edm2-img512-xs-uncond-2147483-0.020', 1.20),  # fid = 1.85
    'edm2-img512-xl-guid-dino':        _preset('edm2-img512-xl-1342177-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.70),  # fd_dinov2 = 35.67
    'edm2-img512-xxl-guid-fid':        _preset('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20), # fid = 1.81
    'edm2-img512-xxl-guid-dino':       _preset('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.70), # fd_dinov2 = 33.09

    # Autoguidance paper, Table 1 (guidance by a smaller, less trained model).
    'edm2-img512-s-autog-fid':         _preset('edm2-img512-s-2147483-0.070', 'edm2-img512-xs-0134217-0.125', 2.10),          # fid = 1.34
    'edm2-img512-s-autog-dino':        _preset('edm2-img512-s-2147483-0.120', 'edm2-img512-xs-0134217-0.165', 2.45),          # fd_dinov2 = 36.67
    'edm2-img512-xxl-autog-fid':       _preset('edm2-img512-xxl-0939524-0.075', 'edm2-img512-m-0268435-0.155', 2.05),         # fid = 1.25
    'edm2-img512-xxl-autog-dino':      _preset('edm2-img512-xxl-0939524-0.130', 'edm2-img512-m-0268435-0.205', 2.30),         # fd_dinov2 = 24.18
    'edm2-img512-s-uncond-autog-fid':  _preset('edm2-img512-s-uncond-2147483-0.070', 'edm2-img512-xs-uncond-0134217-0.110', 2.85),  # fid = 3.86
    'edm2-img512-s-uncond-autog-dino': _preset('edm2-img512-s-uncond-2147483-0.090', 'edm2-img512-xs-uncond-0134217-0.125', 2.90),  # fd_dinov2 = 90.39
    'edm2-img64-s-autog-fid':          _preset('edm2-img64-s-1073741-0.045', 'edm2-img64-xs-0134217-0.110', 1.70),            # fid = 1.01
    'edm2-img64-s-autog-dino':         _preset('edm2-img64-s-1073741-0.105', 'edm2-img64-xs-0134217-0.175', 2.20),            # fd_dinov2 = 31.85
}
# fmt: on

# ----------------------------------------------------------------------------
# Command line.


# The guidance intervals of Kynkaanniemi et al. (2024) for EDM2-XXL, as noise levels of the default
# 32-step schedule (sigma_min 0.002, sigma_max 80, rho 7). The paper guides steps 17-22 (FID, w = 2.0)
# and 13-19 (FD_DINOv2, w = 2.9), counted from 0 as the loop of the official sampler counts them:
# t_17..t_22 = 1.6086..0.2830 and t_13..t_19 = 4.9991..0.8446. Each bound is rounded outwards and
# still excludes the neighbouring steps (t_16 = 2.1739, t_23 = 0.1886; t_12 = 6.4637, t_20 = 0.5977).
paper_guidance_intervals = {
    "fid": dict(steps=(17, 22), guidance=2.0, interval=(0.28, 1.61)),
    "dino": dict(steps=(13, 19), guidance=2.9, interval=(0.84, 5.0)),
}


def resolve_options(preset: Optional[str] = None, **opts: Any) -> dnnlib.EasyDict:
    """Apply a preset (options given explicitly, i.e. not None, win) and check the result.
    Guidance 1 drops the guiding network, so it is never loaded."""
    opts = dnnlib.EasyDict(opts)
    for key in ("net", "gnet", "guidance"):
        opts.setdefault(key, None)
    if preset is not None:
        if preset not in config_presets:
            raise click.BadParameter(f'unknown preset "{preset}"; see --help for the list', param_hint="'--preset'")
        for key, value in config_presets[preset].items():
            if opts[key] is None:
                opts[key] = value
    if opts.net is None:
        raise click.UsageError("Please specify either --preset or --net")
    if opts.guidance is None or opts.guidance == 1:
        opts.guidance = 1
        opts.gnet = None
    elif opts.gnet is None:
        raise click.UsageError(f"--guidance={opts.guidance:g} needs a guiding network: please specify --gnet")
    return opts


_PRESETS_HELP = """\b
Presets (see config_presets for the exact models and guidance):
  edm2-img512-{xs|s|m|l|xl|xxl}-{fid|dino}         no guidance
  edm2-img64-{s|m|l|xl}-fid                        no guidance
  edm2-img512-{xs|s|m|l|xl|xxl}-guid-{fid|dino}    classifier-free guidance
  edm2-img512-{s|xxl}-autog-{fid|dino}             autoguidance
  edm2-img512-s-uncond-autog-{fid|dino}            autoguidance, unconditional
  edm2-img64-s-autog-{fid|dino}                    autoguidance

\b
Guidance interval (Kynkaanniemi et al. 2024): a step uses guidance when its noise level t_i
(i = 0..N-1, from sigma_max down) lies in [LO,HI]; elsewhere the guiding net is not run.
The paper's EDM2-XXL settings are steps 17-22 (FID) and 13-19 (FD_DINOv2) of the default
32-step schedule, i.e. t = 1.6086..0.2830 and t = 4.9991..0.8446:
  --preset=edm2-img512-xxl-guid-fid --guidance=2.0 --guidance-interval=0.28,1.61
  --preset=edm2-img512-xxl-guid-dino --guidance=2.9 --guidance-interval=0.84,5.0"""


# fmt: off
@click.command(epilog=_PRESETS_HELP)
@click.option("--preset", help="Configuration preset", metavar="STR")
@click.option("--net", help="Network pickle filename or URL", metavar="PATH|URL")
@click.option("--gnet", help="Guiding network pickle filename or URL", metavar="PATH|URL")
@click.option("--outdir", help="Where to save the output images", metavar="DIR", required=True)
@click.option("--subdirs", help="Create subdirectory for every 1000 seeds", is_flag=True)
@click.option("--seeds", help="List of random seeds (e.g. 1,2,5-10)", metavar="LIST", type=cli.ParsedParam(parse_int_list), default="16-19", show_default=True)
@click.option("--class", "class_idx", help="Class label  [default: random]", metavar="INT", type=click.IntRange(min=0))
@click.option("--batch", "max_batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--steps", "num_steps", help="Number of sampling steps", metavar="INT", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--sigma_min", help="Lowest noise level", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option("--sigma_max", help="Highest noise level", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option("--rho", help="Time step exponent", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option("--guidance", help="Guidance strength  [default: 1; no guidance]", metavar="FLOAT", type=float, default=None)
@cli.guidance_interval_option
@cli.sampler_option
@click.option("--S_churn", "S_churn", help="Stochasticity strength (heun only)", metavar="FLOAT", type=click.FloatRange(min=0), default=0, show_default=True)
@click.option("--S_min", "S_min", help="Stoch. min noise level", metavar="FLOAT", type=click.FloatRange(min=0), default=0, show_default=True)
@click.option("--S_max", "S_max", help="Stoch. max noise level", metavar="FLOAT", type=click.FloatRange(min=0), default="inf", show_default=True)
@click.option("--S_noise", "S_noise", help="Stoch. noise inflation", metavar="FLOAT", type=float, default=1, show_default=True)
@sampling_options
# fmt: on
def cmdline(preset: Optional[str], **opts: Any) -> None:
    """Generate random images using the given model.

    Examples:

    \b
    # Generate a couple of images and save them as out/*.png
    python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out

    \b
    # Generate 50000 images using 8 GPUs and save them as out/*/*.png
    torchrun --standalone --nproc_per_node=8 generate_images.py \\
        --preset=edm2-img512-s-guid-fid --outdir=out --subdirs --seeds=0-49999
    """
    opts = resolve_options(preset, **opts)
    with cli.one_line_errors():  # e.g. a bad pickle, a full disk
        dnnlib.util.check_output_dir(opts.outdir, "--outdir")
        for option in ("net", "gnet"):
            if opts[option] is not None:
                dnnlib.util.check_input_file(opts[option], f"--{option}", what="network pickle")
        dist.init()
        for _r in tqdm.tqdm(generate_images(**opts), unit="batch", disable=(dist.get_rank() != 0)):
            pass


# ----------------------------------------------------------------------------


if __name__ == "__main__":
    cmdline()

# ----------------------------------------------------------------------------
