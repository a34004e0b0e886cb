"""The `pbs` app: every command registered through Typer's public API, listed in `pbs --help` with its
one-line description, parser errors as one ``error:`` line; and a command imports only what it uses
(`pbs --help` no torch; `pbs viz-mask` torch but no transformers, Triton or matplotlib)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pbs_cli
from pbs_cli import app as pbs_app
from pbs_cli.commands import calibrate, env, eval as evaluate, prefill, profile, report, viz_mask

ENV = {"COLUMNS": "300", "NO_COLOR": "1"}
# name -> the help text of what `pbs NAME` runs (the oracle for the listing), in `pbs --help` order
COMMANDS = {"prefill": prefill.command.__doc__, "env": env.command.__doc__, "viz-mask": viz_mask.command.__doc__,
            "profile": profile.command.__doc__, "eval": evaluate.command.__doc__,
            "calibrate": calibrate.command.__doc__, "report": report.app.info.help}


def _summary(doc: str) -> str:
    """The first paragraph of a help text, on one line (what the listing shows)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def test_help_lists_every_command_with_its_description_in_order():
    got = CliRunner().invoke(pbs_app.app, ["--help"], env=ENV)
    assert got.exit_code == 0
    rows = [ln for ln in got.stdout.splitlines() if re.match(r"^│ [a-z-]+ ", ln)]
    listed = [re.match(r"^│ ([a-z-]+) ", ln).group(1) for ln in rows]
    commands_at = listed.index("prefill")
    assert listed[commands_at:] == list(COMMANDS)
    for name, row in zip(COMMANDS, rows[commands_at:]):
        assert " ".join(row.strip("│ ").split()) == f"{name} {_summary(COMMANDS[name])}"


@pytest.mark.parametrize("args", [[], ["report"]])
def test_a_group_alone_prints_its_help_and_exits_2(args):
    got = CliRunner().invoke(pbs_app.app, args, env=ENV)
    assert got.exit_code == 2
    assert "Usage:" in got.stdout and got.stderr == ""


def test_unknown_command_is_one_line_with_a_suggestion():
    """Typer's refusal and suggestion, as one ``error:`` line (README, "Exit codes")."""
    got = CliRunner().invoke(pbs_app.app, ["viz-mas"], env=ENV)
    assert got.exit_code == 2
    assert got.stderr.splitlines() == ["error: No such command 'viz-mas'. Did you mean 'viz-mask'? (see 'pbs --help')"]


@pytest.mark.parametrize("args, line", [
    (["viz-mask", "--bogus"], "error: No such option: --bogus (see 'pbs viz-mask --help')"),
    (["report", "show"], "error: Missing argument 'file' (see 'pbs report show --help')"),
    (["report", "shw"], "error: No such command 'shw'. Did you mean 'show'? (see 'pbs report --help')"),
    (["profile", "--heads", "0"], "error: Invalid value for '--heads': Input should be greater than or equal to 1 "
                                  "(see 'pbs profile --help')"),
])
def test_parser_errors_are_one_line_and_exit_2(args, line):
    got = CliRunner().invoke(pbs_app.app, args, env=ENV)
    assert got.exit_code == 2
    assert got.stderr.splitlines() == [line]


def test_the_app_uses_typers_public_api_only():
    """No module of pbs_cli imports Typer's private modules or its command-building internals."""
    private = re.compile(r"^typer\.(_|main$|models$)")
    for path in Path(pbs_cli.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(private.match(n) for n in names), f"{path.name} imports {names}"


def _modules_after(args: list[str]) -> dict:
    """Run ``pbs ARGS`` as the console script does, in a fresh interpreter; which modules got imported."""
    probe = (
        "import atexit, json, sys\n"
        "def report():\n"
        "    heavy = ('torch', 'transformers', 'triton', 'matplotlib', 'pbs_kernels.attention')\n"
        "    names = [m for m in heavy if m in sys.modules]\n"
        "    sys.stderr.write('\\nMODULES ' + json.dumps(names) + '\\n')\n"
        "atexit.register(report)\n"
        f"sys.argv = ['pbs', *{args!r}]\n"
        "from pbs_cli.app import main\n"
        "main()\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False,
                         env={**__import__("os").environ, **ENV})
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("MODULES ")][-1]
    return json.loads(line.removeprefix("MODULES "))


def test_help_imports_no_torch():
    assert _modules_after(["--help"]) == []


def test_viz_mask_imports_torch_but_no_transformers_triton_or_matplotlib():
    assert _modules_after(["viz-mask", "--seq-len", "512"]) == ["torch"]
