"""Property-based tests (hypothesis) over the tool's inputs: sizes, PBS parameters, CLI options, documents.

Every generated input must end in a result or in one clear error with a documented exit code: never a
traceback, never an undocumented exception type.

Budget: a fixed seed (``derandomize``) and few examples by default, so CI is fast and repeatable; set
``PBS_HYPOTHESIS_BUDGET=big`` for a longer, still deterministic search (and ``=random`` for a fresh seed).
"""

from __future__ import annotations

import math
import os
import re

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pbs_cli import errors
from pbs_cli.errors import UsageError
from pbs_cli.sizes import format_size, parse_size, parse_sizes
from pbs_kernels import PBSConfig

_BUDGET = os.environ.get("PBS_HYPOTHESIS_BUDGET", "small")
settings.register_profile("pbs-small", max_examples=60, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("pbs-big", max_examples=1500, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("pbs-random", max_examples=1500, derandomize=False, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile({"big": "pbs-big", "random": "pbs-random"}.get(_BUDGET, "pbs-small"))

# CLI cases run a model forward each: fewer of them, scaled with the budget.
CLI_EXAMPLES = {"small": 25}.get(_BUDGET, 300)

UNITS = {"": 1, "k": 1024, "m": 1024**2}


# -- sizes ------------------------------------------------------------------------------------------


def _oracle_size(text: str) -> int | None:
    """Independent reading of the size grammar: optional blanks, ASCII digits, optional k/m (any case),
    optional blanks; positive; fits the kernels' int32 positions. None = must be refused."""
    body = text.strip(" \t\n\r\f\v")
    unit = ""
    if body[-1:].lower() in ("k", "m"):
        body, unit = body[:-1].rstrip(" \t\n\r\f\v"), body[-1].lower()
    if not body or any(c not in "0123456789" for c in body) or len(body) > 12:
        return None
    value = int(body) * UNITS[unit]
    return value if 0 < value < 2**31 else None


size_text = st.one_of(
    st.text(max_size=12),
    st.builds(lambda n, u, a, b: f"{a}{n}{u}{b}", st.integers(0, 10**7),
              st.sampled_from(["", "k", "K", "m", "M", "g", "kb", "KiB", ".5k", "e3"]),
              st.sampled_from(["", " ", "\t", "+", "-", "0"]), st.sampled_from(["", " ", "\n", "x", ","])),
)


@given(size_text)
@example("9" * 5000)  # more digits than Python's int() accepts
@example("١٢٨k")  # non-ASCII decimal digits
@example("2048m")  # 2**31: one past int32
@example("2047m")
@example("0k")
@example("")
def test_parse_size_agrees_with_oracle_or_refuses_clearly(text):
    expected = _oracle_size(text)
    if expected is None:
        with pytest.raises(UsageError) as info:
            parse_size(text)
        message = str(info.value)
        assert "\n" not in message.strip() and len(message) < 300, "one short line, even for huge input"
    else:
        assert parse_size(text) == expected


@given(st.integers(1, 2**31 - 1))
def test_format_size_round_trips(n):
    assert parse_size(format_size(n)) == n


@given(st.lists(st.integers(1, 2**20), min_size=1, max_size=6), st.sampled_from([",", ", ", " ,"]))
def test_parse_sizes_keeps_order_and_drops_duplicates(values, sep):
    text = sep.join(format_size(v) for v in values)
    expected = list(dict.fromkeys(values))
    assert parse_sizes(text) == expected


@given(st.text(max_size=40))
def test_parse_sizes_never_raises_anything_but_usage_error(text):
    try:
        sizes = parse_sizes(text)
    except UsageError as exc:
        assert len(str(exc)) < 300
    else:
        assert sizes and all(isinstance(s, int) and 0 < s < 2**31 for s in sizes)
        assert len(set(sizes)) == len(sizes)


# -- PBS parameters ---------------------------------------------------------------------------------

config_fields = st.fixed_dictionaries(
    {},
    optional={
        "block_size": st.one_of(st.sampled_from([16, 32, 64, 128, 256]), st.integers(-300, 600)),
        "segment_size": st.one_of(st.sampled_from([128, 256, 512, 1024]), st.integers(-600, 2000)),
        "threshold": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e-9, 0.9])),
        "permute": st.booleans(),
        "per_head_permutation": st.booleans(),
        "sink": st.booleans(),
        "local_blocks": st.integers(-5, 50),
        "dense_below": st.integers(-5, 2**20),
    },
)


def _valid(fields: dict) -> bool:
    b = fields.get("block_size", 128)
    s = fields.get("segment_size", 256)
    t = fields.get("threshold", 0.9)
    return (b >= 16 and b & (b - 1) == 0 and s >= b and s % b == 0 and not math.isnan(t) and 0.0 < t <= 1.0
            and fields.get("local_blocks", 0) >= 0 and fields.get("dense_below", 0) >= 0)


@given(config_fields)
def test_pbs_config_accepts_exactly_the_valid_parameters(fields):
    if _valid(fields):
        cfg = PBSConfig(**fields)
        assert PBSConfig.from_dict(cfg.to_dict()) == cfg
        for name, value in fields.items():
            assert getattr(cfg, name) == value
    else:
        with pytest.raises(ValueError) as info:
            PBSConfig(**fields)
        message = str(info.value)
        # the message names the parameter that was wrong
        assert re.search(r"block_size|segment_size|threshold|local_blocks|dense_below", message), message


@given(st.dictionaries(st.text(min_size=1, max_size=12), st.integers(), max_size=3))
def test_pbs_config_from_dict_refuses_unknown_names(data):
    known = {"block_size", "segment_size", "threshold", "permute", "per_head_permutation", "sink",
             "local_blocks", "dense_below"}
    assume(set(data) - known)
    with pytest.raises(ValueError, match="unknown PBS parameter"):
        PBSConfig.from_dict(data)


def test_exit_codes_are_the_documented_ones():
    assert (errors.OK, errors.RUNTIME, errors.USAGE, errors.UNSUPPORTED, errors.OUT_OF_MEMORY,
            errors.INTERRUPTED) == (0, 1, 2, 3, 4, 130)
    assert set(errors.EXIT_CODES) == {0, 1, 2, 3, 4, 130}
