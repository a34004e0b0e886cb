"""The lazily composed `pbs` app: same help as registering every command up front, and a command
imports only what it uses (`pbs --help` no torch; `pbs viz-mask` no transformers, no matplotlib)."""

import importlib
import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from pbs_cli import app as lazy

ENV = {"COLUMNS": "100", "NO_COLOR": "1"}


def _eager_app() -> typer.Typer:
    """The app as it was composed before lazy loading: every module imported, every command registered."""
    eager = typer.Typer(name="pbs", help=lazy.app.info.help, no_args_is_help=True, pretty_exceptions_show_locals=False,
                        rich_markup_mode="rich")
    eager.callback()(lazy._root)
    for name, (module, attr) in lazy.COMMANDS.items():
        target = getattr(importlib.import_module(f"pbs_cli.commands.{module}"), attr)
        if attr == "app":
            eager.add_typer(target, name=name)
        else:
            eager.command(name)(target)
    return eager


@pytest.mark.parametrize("args", [["--help"], [], ["report", "--help"], ["viz-mask", "--help"], ["report", "show", "--help"]])
def test_help_is_what_the_eager_app_prints(args):
    runner = CliRunner()
    got, expected = runner.invoke(lazy.app, args, env=ENV), runner.invoke(_eager_app(), args, env=ENV)
    assert (got.exit_code, got.stdout, got.stderr) == (expected.exit_code, expected.stdout, expected.stderr)
    if args == ["--help"]:
        assert all(name in got.stdout for name in lazy.COMMANDS)


@pytest.mark.parametrize("name", list(lazy.COMMANDS))
def test_listed_help_is_read_from_source_not_guessed(name, monkeypatch):
    real = lazy.load_command(name).help
    monkeypatch.setattr(lazy, "load_command", lambda n: pytest.fail(f"{n}: listed_help fell back to importing"))
    assert lazy.listed_help(name) == real


def test_unknown_command_is_refused_as_the_eager_app_does():
    """The same refusal and suggestion as Typer's own group, as one ``error:`` line (README, "Exit codes")."""
    got, expected = CliRunner().invoke(lazy.app, ["viz-mas"], env=ENV), CliRunner().invoke(_eager_app(), ["viz-mas"], env=ENV)
    assert got.exit_code == expected.exit_code == 2
    message = "No such command 'viz-mas'. Did you mean 'viz-mask'?"
    assert message in expected.stderr
    assert got.stderr.splitlines() == [f"error: {message} (see 'pbs --help')"]


def _modules_after(args: list[str]) -> dict:
    """Run ``pbs ARGS`` as the console script does, in a fresh interpreter; which modules got imported."""
    probe = (
        "import atexit, json, sys\n"
        "def report():\n"
        "    names = [m for m in ('torch', 'transformers', 'matplotlib', 'numpy') if m in sys.modules]\n"
        "    cmds = sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('pbs_cli.commands.'))\n"
        "    sys.stderr.write('\\nMODULES ' + json.dumps({'heavy': names, 'commands': cmds}) + '\\n')\n"
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


def test_help_imports_no_torch_and_no_command_module():
    seen = _modules_after(["--help"])
    assert seen == {"heavy": [], "commands": []}


def test_viz_mask_imports_its_own_module_and_torch_only():
    seen = _modules_after(["viz-mask", "--seq-len", "512"])
    assert seen["commands"] == ["viz_mask"]
    assert "torch" in seen["heavy"] and "transformers" not in seen["heavy"] and "matplotlib" not in seen["heavy"]
