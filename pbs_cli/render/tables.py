"""Rich tables on stdout at a width that keeps every number whole."""

from __future__ import annotations

from ..console import out


def print_table(table) -> None:
    """Tables are wide: when stdout is not a terminal, do not wrap them at Rich's default 80 columns; in a
    terminal narrower than the table's narrowest layout that splits no number or word, render at that
    layout's width (the terminal wraps the lines) rather than break numbers across lines."""
    if out.is_terminal:
        from rich.console import Console
        from rich.measure import Measurement

        needed = Measurement.get(out, out.options.update_width(10**4), table).minimum
        if needed <= out.width:
            out.print(table)
        else:
            Console(file=out.file, width=needed, force_terminal=True, no_color=out.no_color).print(table)
    else:
        from rich.console import Console

        Console(width=240, highlight=False).print(table)


def emit(renderable) -> None:
    """Print to stdout; pipes and files get 160 columns (whole rows), not Rich's 80-column default."""
    from rich.console import Console

    (out if out.is_terminal else Console(width=160, soft_wrap=True)).print(renderable)
