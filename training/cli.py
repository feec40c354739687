"""Command-line glue shared by the scripts: parsed parameters, library errors as click's one-line error,
and the options of sampling (the solver, the guidance interval, how networks are loaded and run).

Only the top-level scripts import this module; the library beside and below it raises plain exceptions
and never imports click.
"""

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Callable, Optional

import click

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training.sampling import SAMPLERS, parse_guidance_interval


class ParsedParam(click.ParamType):
    """A click type over a parse function (text -> value) that raises ValueError with a one-line message;
    values that are not strings (defaults given as parsed values) pass through ``parse`` unchanged."""

    def __init__(self, parse: Callable[[Any], Any], name: str = "LIST", quote: bool = False):
        self.parse, self.name, self.quote = parse, name, quote

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            return self.parse(value)
        except ValueError as err:
            self.fail(f"{value!r}: {err}" if self.quote else str(err), param, ctx)


# Errors that library functions raise for bad input, unreadable or unwritable files, or a tool run under torchrun.
LIBRARY_ERRORS = (ValueError, OSError, dist.SingleProcessOnly)


@contextlib.contextmanager
def one_line_errors(prefix: str = "") -> Iterator[None]:
    """Library errors become click's one-line ``Error: ...`` (non-zero exit, no traceback)."""
    try:
        yield
    except LIBRARY_ERRORS as err:
        raise click.ClickException(prefix + dnnlib.util.one_line(err)) from None


def library_errors(fn: Callable) -> Callable:
    """Decorator form of ``one_line_errors`` for a click command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_line_errors():
            return fn(*args, **kwargs)

    return wrapper


def sampling_options(fn: Callable) -> Callable:
    """The options of how networks are loaded and run (generate_images.py and calculate_metrics.py gen)."""
    # fmt: off
    options = [
        click.option("--trust-embedded-code", help="Run the code embedded in network pickles (only for pickles you trust)", is_flag=True),
        click.option("--compile", help="torch.compile the networks: faster steps after a one-time compile of tens of seconds or more  [default: off]", is_flag=True),
        click.option("--precision", help="fp32, fp16 or bf16 (autocast); fp16 needs CUDA, bf16 CUDA or a bf16 CPU  [default: the network's own]", metavar="NAME", type=click.Choice(misc.PRECISIONS)),
        click.option("--tf32", help="Allow TF32 in float32 matmuls and convolutions (CUDA only)  [default: off]", is_flag=True),
    ]
    # fmt: on
    for option in reversed(options):
        fn = option(fn)
    return fn


# The solver and the guidance interval (generate_images.py and calculate_metrics.py gen).
# fmt: off
sampler_option = click.option("--sampler", "sampler_fn", help="ODE solver: heun (EDM, 2 evaluations per step), euler or dpmpp-2m (DPM-Solver++(2M); 1 per step)", type=click.Choice(list(SAMPLERS)), default="heun", show_default=True)
guidance_interval_option = click.option("--guidance-interval", help="Guide only the steps whose noise level t_i lies in [LO,HI] (see generate_images.py --help)  [default: every step]", metavar="LO,HI", type=ParsedParam(parse_guidance_interval, "LO,HI"))
# fmt: on
