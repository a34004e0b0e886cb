"""`pbs calibrate`: find the sparsest PBS parameters that meet a fidelity target on the user's model
and text, and save them as a named preset (`--profile NAME` then uses it)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import command_boundary
from ..errors import UsageError
from ..options import DEFAULT_MODEL, Device, Dtype, Json, Model, RecordOutput, check_outputs


@command_boundary
def command(
    doc: Annotated[str, typer.Option("--doc", help="Real text to calibrate on (UTF-8 file).", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="Preset name to write (letters, digits, -, _, .; not a "
                                      "built-in preset's name).", show_default=False)],
    model: Model = DEFAULT_MODEL,
    target_recall: Annotated[float | None, typer.Option("--target-recall", help="Mean attention-mass recall "
                                                        "of sampled query rows to reach, in (0, 1].")] = None,
    target_kl: Annotated[float | None, typer.Option("--target-kl", help="Mean KL(dense || PBS) of the "
                                                    "next-token distributions to stay under (nats, > 0).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="Preset whose other parameters are "
                                                "kept (default: 'default').")] = None,
    block_sizes: Annotated[str, typer.Option("--block-sizes", help="Block sizes to search.")] = "64,128",
    max_tokens: Annotated[str | None, typer.Option("--max-tokens", help="Use the first N tokens of DOC "
                                                   "(default: the model's context).")] = None,
    recall_rows: Annotated[int, typer.Option("--recall-rows", min=1, help="Query rows per layer sampled "
                                             "for recall.")] = 64,
    device: Device = "auto",
    dtype: Dtype = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing preset / --output.")] = False,
    as_json: Json = False,
    output: RecordOutput = None,
) -> None:
    """Find the sparsest block size and threshold meeting --target-recall or --target-kl; save it as preset NAME.

    --target-recall is measured on dense activations (fast); --target-kl runs a PBS forward per step."""
    check_outputs({"--output": output}, force)
    try:
        sizes = tuple(int(x) for x in block_sizes.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"invalid --block-sizes {block_sizes!r}; use e.g. 64,128") from None
    from ..engine import calibration
    from ..engine.sizes import parse_size

    request = calibration.CalibrateRequest(
        doc=doc, name=name, model=model, target_recall=target_recall, target_kl=target_kl, profile=profile,
        block_sizes=sizes, max_tokens=parse_size(max_tokens) if max_tokens else None, recall_rows=recall_rows,
        device=device, dtype=dtype, force=force)
    rec = calibration.run(request)
    from ..render.calibration import deliver

    deliver(rec, as_json, output, name)
