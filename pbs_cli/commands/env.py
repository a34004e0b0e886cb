"""`pbs env`: versions, device, GPU, whether the Triton kernels can run, where caches and presets live."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import command_boundary


@command_boundary(check_settings=False)  # lists the kernel settings that other commands refuse
def command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show versions, device and GPU, whether the Triton kernels are usable, and where caches and presets live."""
    from ..engine.environment import collect
    from ..render.environment import deliver

    deliver(collect(), as_json)
