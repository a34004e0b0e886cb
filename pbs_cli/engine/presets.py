"""Named PBS presets and model aliases, read from TOML.

Two places, later ones win:

1. the presets shipped in the package ``pbs_profiles`` (``profiles/pbs_profiles/`` in the source tree),
   read through ``importlib.resources`` so editable and wheel installs behave the same;
2. the user's profiles folder, ``$PBS_CONFIG_DIR`` if set, else ``~/.config/pbs/profiles``
   (``pbs calibrate`` writes its presets there).

A preset is ``<name>.toml`` with an optional ``description`` string and a ``[pbs]`` table of
``PBSConfig`` fields; other tables (e.g. ``[calibration]`` metadata) are kept but not interpreted.
Model aliases live in ``models.toml`` under ``[aliases.<name>]`` with ``source``, ``profile`` and
``description``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pbs_kernels.config import PBSConfig

from ..errors import UsageError

ALIASES_FILE = "models.toml"
DEFAULT_PROFILE = "default"
GPU_PROFILE = "gpu"  # chosen on CUDA for a preset the user did not name whose selection is beyond the published one


@dataclass(frozen=True)
class Profile:
    """A named preset: where it came from, what it says, the PBS parameters it sets."""

    name: str
    origin: str  # "builtin" or the user file's path
    description: str
    params: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> PBSConfig:
        try:
            return PBSConfig.from_dict(self.params)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"profile {self.name!r} ({self.origin}) is invalid: {exc}") from None


@dataclass(frozen=True)
class ModelAlias:
    name: str
    source: str
    profile: str | None
    description: str
    origin: str


def user_profiles_dir() -> Path:
    """``$PBS_CONFIG_DIR`` or ``~/.config/pbs/profiles`` (may not exist)."""
    env = os.environ.get("PBS_CONFIG_DIR")
    return Path(env).expanduser() if env else Path.home() / ".config" / "pbs" / "profiles"


def _parse(text: str | UsageError, origin: str) -> dict[str, Any]:
    if isinstance(text, UsageError):  # the file could not be read (``_user_files``)
        raise text
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot read {origin}: {exc}; fix or remove the file") from None


def _builtin_files() -> dict[str, str]:
    """file name -> text of every TOML file shipped in ``pbs_profiles``."""
    root = resources.files("pbs_profiles")
    return {p.name: p.read_text(encoding="utf-8") for p in root.iterdir() if p.name.endswith(".toml")}


def _user_files() -> dict[str, tuple[str, str | UsageError]]:
    """file name -> (path, its text or the error reading it) of the TOML files in the user profiles folder."""
    folder = user_profiles_dir()
    if not folder.is_dir():
        return {}
    found: dict[str, tuple[str, str | UsageError]] = {}
    for p in sorted(folder.glob("*.toml")):
        try:
            found[p.name] = (str(p), p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            found[p.name] = (str(p), UsageError(f"cannot read profile {str(p)!r}: {exc}; fix or remove the file"))
    return found


def _profile_from(name: str, data: dict[str, Any], origin: str) -> Profile:
    params = data.get("pbs", {})
    if not isinstance(params, dict):
        raise UsageError(f"profile {name!r} ({origin}): [pbs] must be a table of PBS parameters")
    for key, value in params.items():
        _check_type(key, value, origin)
    extra = {k: v for k, v in data.items() if k not in ("pbs", "description")}
    return Profile(name, origin, str(data.get("description", "")), dict(params), extra)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of integers"}


def _check_type(key: str, value: Any, origin: str) -> None:
    """A [pbs] value of the type its PBSConfig field needs (what ``threshold = "high"`` gets: a UsageError
    naming the file and the key, not a comparison error from inside the config)."""
    fields = {f.name: f for f in dataclasses.fields(PBSConfig)}
    if key not in fields:
        raise UsageError(f"{origin}: [pbs] {key} is not a PBS parameter; known: {', '.join(fields)}")
    kind = type(fields[key].default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is tuple:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise UsageError(f"{origin}: [pbs] {key} = {value!r} must be {_KINDS.get(kind, kind.__name__)} (default "
                         f"{fields[key].default!r}); fix or remove the file")


def _load_profiles() -> tuple[dict[str, Profile], dict[str, str]]:
    """(presets by name, {name: why it cannot be read}): user presets replace built-in ones of the same
    name; a user file that does not parse, or has a value of the wrong type, is set aside with the reason
    (``get_profile`` of that name raises it; ``pbs env`` lists it) instead of breaking every command."""
    found: dict[str, Profile] = {}
    for fname, text in sorted(_builtin_files().items()):
        if fname == ALIASES_FILE:
            continue
        name = fname[: -len(".toml")]
        found[name] = _profile_from(name, _parse(text, f"built-in {fname}"), "builtin")
    broken: dict[str, str] = {}
    for fname, (path, text) in _user_files().items():
        if fname == ALIASES_FILE:
            continue
        name = fname[: -len(".toml")]
        try:
            found[name] = _profile_from(name, _parse(text, path), path)
        except UsageError as exc:
            broken[name] = str(exc)
            found.pop(name, None)  # a broken user file does not fall back to the built-in of its name
    return found, broken


def profiles() -> dict[str, Profile]:
    """Every usable preset by name; user presets replace built-in ones of the same name."""
    return _load_profiles()[0]


def profile_problems() -> dict[str, str]:
    """{name: why its file cannot be used} for the user presets that are set aside."""
    return _load_profiles()[1]


def get_profile(name: str) -> Profile:
    known, broken = _load_profiles()
    if name in broken:
        raise UsageError(broken[name])
    if name not in known:
        raise UsageError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(known))} "
                         f"(user presets go in {user_profiles_dir()})")
    return known[name]


def resolve_config(profile: str | None = None, *, device: str | None = None, explicit: bool | None = None,
                   **overrides: Any) -> tuple[PBSConfig, str]:
    """The PBS parameters for a run: the named preset (default: ``default``) with ``overrides``
    (None values ignored) applied. Returns (config, profile name). Invalid values -> UsageError.

    On a CUDA ``device``, a preset the user did not choose (``explicit`` False; by default: no
    ``profile`` given) whose selection goes beyond the published method is replaced by ``gpu``
    (GPU_PROFILE): on an H100 planning the sampled-row selection takes 17-50% of a dense layer, and
    whole-model prefill with it measured slower than dense (BENCHMARKS.md)."""
    name = profile or DEFAULT_PROFILE
    base = get_profile(name)
    base.config()  # a preset with an invalid value: the error names its file
    params = dict(base.params)
    params.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = PBSConfig.from_dict(params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid PBS parameters: {exc}") from None
    chosen = explicit if explicit is not None else profile is not None
    if not chosen and device is not None and str(device).startswith("cuda") and config.beyond_published():
        return resolve_config(GPU_PROFILE, explicit=True, **overrides)
    return config, name


def model_aliases() -> dict[str, ModelAlias]:
    """Every model alias by name; the user's ``models.toml`` adds or replaces entries."""
    sources: list[tuple[str, str]] = []
    builtin = _builtin_files()
    if ALIASES_FILE in builtin:
        sources.append(("builtin", builtin[ALIASES_FILE]))
    user = _user_files()
    if ALIASES_FILE in user:
        sources.append(user[ALIASES_FILE])
    found: dict[str, ModelAlias] = {}
    for origin, text in sources:
        table = _parse(text, origin).get("aliases", {})
        for name, entry in table.items():
            if not isinstance(entry, dict) or "source" not in entry:
                raise UsageError(f"model alias {name!r} in {origin} needs a 'source' entry")
            found[name] = ModelAlias(name, str(entry["source"]), entry.get("profile"),
                                     str(entry.get("description", "")), origin)
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_profile(config: PBSConfig, description: str = "", extra: dict[str, dict[str, Any]] | None = None) -> str:
    """TOML text of a preset (flat tables of scalars and lists), readable by ``profiles()``."""
    lines = []
    if description:
        lines.append(f"description = {_toml_value(description)}")
        lines.append("")
    lines.append("[pbs]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.to_dict().items()]
    for table, values in (extra or {}).items():
        lines += ["", f"[{table}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def check_new_profile(name: str, force: bool = False) -> Path:
    """The file that preset ``name`` would be written to, checked before any work: a valid name (no path),
    not a built-in preset's or the model aliases' (a user file of that name would silently replace the
    built-in for every later command), and not an existing file unless ``force``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise UsageError(f"invalid profile name {name!r}: use letters, digits, '-', '_' and '.' (a name, not a path)")
    if name == ALIASES_FILE[: -len(".toml")]:
        raise UsageError(f"{name!r} is reserved for model aliases; choose another profile name")
    if f"{name}.toml" in _builtin_files():
        raise UsageError(f"{name!r} is a built-in preset; saving a user preset under that name would replace it "
                         f"for every command: choose another name, e.g. {name}-calibrated")
    path = user_profiles_dir() / f"{name}.toml"
    if path.exists() and not force:
        raise UsageError(f"profile {str(path)!r} exists; pass --force to overwrite it")
    return path


def save_user_profile(name: str, config: PBSConfig, description: str = "",
                      extra: dict[str, dict[str, Any]] | None = None, force: bool = False) -> Path:
    """Write ``<user profiles dir>/<name>.toml`` atomically (``check_new_profile`` first)."""
    from .reports import atomic_write_text

    path = check_new_profile(name, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_profile(config, description, extra))
    return path
