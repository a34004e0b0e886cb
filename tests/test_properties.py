"""Property-based tests (hypothesis) over the tool's inputs: sizes, PBS parameters, CLI options, documents.

Every generated input must end in a result or in one clear error with a documented exit code: never a
traceback, never an undocumented exception type.

Budget: a fixed seed (``derandomize``) and few examples by default, so CI is fast and repeatable; set
``PBS_HYPOTHESIS_BUDGET=big`` for a longer, still deterministic search (and ``=random`` for a fresh seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from pbs_cli import errors
from pbs_cli.errors import UsageError
from pbs_cli.engine.sizes import format_size, parse_size, parse_sizes
from pbs_kernels import PBSConfig

from fixtures import TINY_CONTEXT, assert_clean_outcome, invoke, tiny_model_dir  # noqa: F401 (fixture)

_BUDGET = os.environ.get("PBS_HYPOTHESIS_BUDGET") or "small"
if _BUDGET not in ("small", "big", "random"):
    raise ValueError(f"PBS_HYPOTHESIS_BUDGET={_BUDGET[:40]!r} is not a valid value; use small, big or random, "
                     "or unset it")
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
    known = {f.name for f in dataclasses.fields(PBSConfig)}
    assume(set(data) - known)
    with pytest.raises(ValueError, match="unknown PBS parameter"):
        PBSConfig.from_dict(data)


def test_exit_codes_are_the_documented_ones():
    assert (errors.OK, errors.RUNTIME, errors.USAGE, errors.UNSUPPORTED, errors.OUT_OF_MEMORY,
            errors.INTERRUPTED) == (0, 1, 2, 3, 4, 130)
    assert set(errors.EXIT_CODES) == {0, 1, 2, 3, 4, 130}


def test_readme_documents_every_exit_code():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*$", readme, flags=re.M))
    assert {int(code) for code in rows} >= set(errors.EXIT_CODES), f"README exit-code table rows: {rows}"
    for code in errors.EXIT_CODES:
        assert rows[str(code)], f"exit code {code} has no meaning in the README"


# -- the CLI: documents ------------------------------------------------------------------------------

# Each CLI example loads a model: no shrinking by default (a failing example is still printed in full).
CLI = settings(max_examples=CLI_EXAMPLES,
               phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if _BUDGET != "small" else []))
# (block, segment) choices: the defaults (the tiny model's whole context is exactly one segment) and
# small blocks (many blocks and segments in a short document)
GEOMETRIES = [(128, 256), (16, 32), (32, 64)]


def _boundaries() -> list[int]:
    near = {0, 1, 2, 3, TINY_CONTEXT - 1, TINY_CONTEXT, TINY_CONTEXT + 1}
    for b, s in GEOMETRIES:
        for edge in (b, s, 2 * s, s + b):
            near |= {edge - 1, edge, edge + 1}
    return sorted(n for n in near if n >= 0)


BOUNDARY_LENGTHS = _boundaries()
# "Z" is in no merge of the tiny tokenizer (its corpus has no Z), so b"Z" * n is exactly n tokens.
documents = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    st.sampled_from(BOUNDARY_LENGTHS).map(lambda n: b"Z" * n),
    st.sampled_from(BOUNDARY_LENGTHS).map(lambda n: b"\xef\xbb\xbf" + b"Z" * n),  # UTF-8 BOM first
    st.sampled_from([
        b"", b"\xef\xbb\xbf", b" \n\t\r\n", b"\x00", b"Z\x00Z", b"\xff\xfe" + "hi".encode("utf-16-le"),
        b"\xc3\x28 invalid continuation", b"caf\xe9 latin-1", "ok \u2028 line separator".encode(),
        b"a" * 20_000,  # one huge line, far past the context
        b"Z" + b"\n" * 3000,
        "\U0001f600 emoji, combining e\u0301".encode(),
    ]),
)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("pbs-home")
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home / "hf"),
            "PBS_CONFIG_DIR": str(home / "config"), "PBS_CACHE_DIR": str(home / "cache")}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _expected_tokens(data: bytes, tokenizer, truncate: bool) -> int | None:
    """Prompt tokens the CLI must report, or None when it must refuse the document (exit 2):
    empty, binary (NUL), not UTF-8, only whitespace, longer than the context without --truncate,
    fewer than 2 tokens."""
    if not data or b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if not text.strip():
        return None
    n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    if n > TINY_CONTEXT and not truncate:
        return None
    n = min(n, TINY_CONTEXT)
    return n if n >= 2 else None


@CLI
@given(data=documents, truncate=st.booleans(), via_stdin=st.booleans(), geometry=st.sampled_from(GEOMETRIES))
@example(data=b"Z" * TINY_CONTEXT, truncate=False, via_stdin=True, geometry=(128, 256))  # exactly one segment
@example(data=b"Z" * (TINY_CONTEXT + 1), truncate=False, via_stdin=True, geometry=(128, 256))  # one past the context
@example(data=b"Z" * (TINY_CONTEXT + 1), truncate=True, via_stdin=False, geometry=(16, 32))
@example(data=b"Z" * 128, truncate=False, via_stdin=False, geometry=(128, 256))  # exactly one block
@example(data=b"Z", truncate=False, via_stdin=True, geometry=(16, 32))  # one token
@example(data=b"", truncate=False, via_stdin=False, geometry=(16, 32))  # zero length
def test_prefill_any_document_ends_in_a_result_or_one_clear_error(tiny_model_dir, tiny_tokenizer, cli_env,
                                                                  tmp_path_factory, data, truncate, via_stdin,
                                                                  geometry):
    block, segment = geometry
    args = ["prefill", "-", "--model", str(tiny_model_dir), "--json", "--block-size", str(block),
            "--segment-size", str(segment)]
    if truncate:
        args.append("--truncate")
    if not via_stdin:
        doc = tmp_path_factory.mktemp("doc") / "doc.txt"
        doc.write_bytes(data)
        args[1] = str(doc)
    result = invoke(args, input=data if via_stdin else None, env=cli_env)
    assert_clean_outcome(result, {0, 2})
    expected = _expected_tokens(data, tiny_tokenizer, truncate)
    if expected is None:
        assert result.exit_code == 2, f"expected a refusal (exit 2), got {result.exit_code}: {result.stdout[:300]}"
        return
    assert result.exit_code == 0, f"expected a result, got exit {result.exit_code}: {result.stderr[-500:]}"
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] == expected
    assert record["truncated"] == (record["document_tokens"] > expected)
    assert record["config"]["block_size"] == block and record["config"]["segment_size"] == segment
    assert len(record["layers"]) == 2
    for layer in record["layers"]:
        assert layer["seq_len"] == expected
        assert 0.0 < layer["density"] <= 1.0
    assert math.isfinite(record["prefill_ms"]) and record["prefill_ms"] > 0


# -- the CLI: options --------------------------------------------------------------------------------

_VALID_DTYPES = {"auto", "bfloat16", "float16", "float32"}
option_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                      max_size=12)


def _expected_option_codes(threshold, block, segment, dtype, device) -> set[int]:
    """The exit codes the CLI may give: {0} when every option is valid on this CPU-only machine, else the
    code of any one of the problems (the order of the checks is the command's business): 2 for a bad PBS
    parameter, --dtype or --device string, 3 for a GPU --device."""
    from pbs_cli.engine.presets import resolve_config

    default = resolve_config(None)[0]  # the shipped default profile fills in what the options leave out
    fields = {"threshold": threshold, "block_size": default.block_size, "segment_size": default.segment_size}
    if block is not None:
        fields["block_size"] = block
    if segment is not None:
        fields["segment_size"] = segment
    fields = {k: v for k, v in fields.items() if v is not None}
    problems = set()
    if not _valid(fields):
        problems.add(2)
    dev = device.strip().lower()
    if re.fullmatch(r"cuda(:[0-9]+)?", dev):
        problems.add(3)
    elif dev not in ("auto", "cpu"):
        problems.add(2)
    if dtype.strip().lower() not in _VALID_DTYPES:
        problems.add(2)
    return problems or {0}


@CLI
@given(
    threshold=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32),
                        st.sampled_from([1.0, 0.5, 1e-6, 0.0, -0.1, 1.0000001])),
    block=st.one_of(st.none(), st.sampled_from([16, 32, 64, 128]), st.integers(-20, 300)),
    segment=st.one_of(st.none(), st.sampled_from([32, 64, 256]), st.integers(-20, 600)),
    dtype=st.one_of(st.sampled_from(sorted(_VALID_DTYPES) + ["FLOAT32", " float32 "]), option_text),
    device=st.one_of(st.sampled_from(["auto", "cpu", "CPU", "cuda", "cuda:0", "cuda:7", "mps", "cpu:0"]), option_text),
)
def test_prefill_options_are_validated_before_any_work(tiny_model_dir, cli_env, threshold, block, segment,
                                                       dtype, device):
    args = ["prefill", "-", "--model", str(tiny_model_dir), "--json", f"--dtype={dtype}", f"--device={device}"]
    if threshold is not None:
        args.append(f"--threshold={threshold!r}")
    if block is not None:
        args.append(f"--block-size={block}")
    if segment is not None:
        args.append(f"--segment-size={segment}")
    expected_codes = _expected_option_codes(threshold, block, segment, dtype, device)
    result = invoke(args, input=b"Z" * 40, env=cli_env)
    assert_clean_outcome(result)
    assert result.exit_code in expected_codes, (
        f"exit {result.exit_code}, expected {expected_codes}; stderr: {result.stderr[-400:]}")
    if result.exit_code == 0:
        assert json.loads(result.stdout)["prompt_tokens"] == 40


@CLI
@given(spec=st.one_of(option_text, st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                           min_size=200, max_size=400),
                      st.sampled_from(["", " ", ".", "..", "/", "x.gguf", "org/name", "org/na me", "~", "-", "a" * 300,
                                       "a/" * 200, "../../etc/passwd", "nonexistent.GGUF", "bad:alias"])))
def test_model_option_never_crashes(cli_env, spec):
    from pbs_cli.engine.presets import model_aliases

    assume(spec.strip() not in model_aliases())  # aliases load the real embedded model (slow tests elsewhere)
    result = invoke(["prefill", "-", f"--model={spec}", "--json"], input=b"Z" * 40, env=cli_env)
    assert_clean_outcome(result, {2, 3})


@CLI
@given(text=st.one_of(size_text, st.lists(size_text, min_size=1, max_size=4).map(",".join)))
@example(text="0")
@example(text="1")  # a single token: refused (at least 2)
@example(text="2")
@example(text="1k,,1k")
@example(text="9" * 5000)
def test_profile_seq_len_any_text_ends_cleanly(cli_env, text):
    try:
        sizes = parse_sizes(text)
    except UsageError:
        sizes = None
    assume(sizes is None or max(sizes) <= 512)  # larger sweeps are real work, not input handling
    result = invoke(["profile", f"--seq-len={text}", "--heads", "1", "--kv-heads", "1", "--head-dim", "16",
                     "--device", "cpu", "--backends", "pbs", "--budget", "0", "--iters", "1", "--warmup", "0",
                     "--block-size", "16", "--segment-size", "32", "--json"], env=cli_env)
    assert_clean_outcome(result)
    if sizes is None or min(sizes) < 2:
        assert result.exit_code == 2, result.stderr[-300:]
    else:
        assert result.exit_code == 0, result.stderr[-300:]
        assert json.loads(result.stdout)["seq_lens"] == sizes


# -- saved reports read back (pbs report show / compare) ---------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def saved_profile(cli_env, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("saved-profile") / "run.json"
    result = invoke(["profile", "--seq-len", "64,128", "--heads", "1", "--kv-heads", "1", "--head-dim", "16",
                     "--device", "cpu", "--backends", "pbs,sdpa-math", "--budget", "0", "--iters", "1",
                     "--warmup", "0", "--block-size", "16", "--segment-size", "32", "-o", str(path)], env=cli_env)
    assert result.exit_code == 0, result.stderr
    return json.loads(path.read_text())


@settings(max_examples=CLI_EXAMPLES * 2)
@given(data=st.data(), jsonl=st.booleans())
def test_report_show_and_compare_survive_damaged_records(saved_profile, cli_env, tmp_path_factory, data, jsonl):
    """A saved profile with one field replaced by any JSON value (or removed) is shown / compared, or
    refused with exit 2 -- never a crash."""
    import copy

    from pbs_cli.render.report_formats import to_jsonl

    doc = copy.deepcopy(saved_profile)
    target = data.draw(st.sampled_from(["top"] + list(range(len(doc["results"])))), label="where")
    holder = doc if target == "top" else doc["results"][target]
    key = data.draw(st.sampled_from(sorted(holder)), label="key")
    if data.draw(st.booleans(), label="remove"):
        del holder[key]
    else:
        holder[key] = data.draw(json_values, label="value")
    folder = tmp_path_factory.mktemp("damaged")
    damaged = folder / ("run.jsonl" if jsonl else "run.json")
    try:
        damaged.write_text(to_jsonl(doc) if jsonl else json.dumps(doc), encoding="utf-8")
    except Exception:  # noqa: BLE001 - the damage broke our own serializer: not an input the CLI can see
        assume(False)
    good = folder / "good.json"
    good.write_text(json.dumps(saved_profile), encoding="utf-8")
    fmt = data.draw(st.sampled_from(["table", "json", "jsonl", "csv", "markdown", "html"]), label="format")
    for args in (["report", "show", str(damaged), "--format", fmt], ["report", "compare", str(good), str(damaged)],
                 ["report", "compare", str(damaged), str(good), "--json"]):
        result = invoke(args, env=cli_env)
        assert_clean_outcome(result, {0, 2})
    gate = invoke(["report", "compare", str(good), str(damaged), "--fail-if-slower", "5"], env=cli_env)
    assert_clean_outcome(gate, {0, 1, 2})
    if gate.exit_code == 1:  # the gate's own verdict, not a crash
        assert "got slower" in gate.stderr, gate.stderr[-300:]


# -- the CLI: output options together (pbs_cli/options.py: check_outputs) -----------------------------------

OUTPUT_NAMES = ["r.json", "r.jsonl", "r.csv", "r.md", "r.html", "t.json", "t.json.gz", "t.txt", "./r.json",
                "sub/../r.json", "r.json.gz"]


def _expected_output_code(output, html, trace, existing, force) -> int:
    """Oracle for `pbs profile -o OUTPUT --html HTML --trace TRACE`: 2 when -o's extension names no format,
    --html does not end in .html, --trace in neither .json nor .json.gz, two options name one file, or one
    exists without --force; else 0."""
    import posixpath

    named = {"-o": output, "--html": html, "--trace": trace}
    named = {k: posixpath.normpath(v) for k, v in named.items() if v is not None}
    if "-o" in named and posixpath.splitext(named["-o"])[1] not in (".json", ".jsonl", ".csv", ".md", ".html"):
        return 2
    if "--html" in named and not named["--html"].endswith(".html"):
        return 2
    if "--trace" in named and not named["--trace"].endswith((".json", ".json.gz")):
        return 2
    if len(set(named.values())) < len(named):
        return 2
    if not force and any(v in existing for v in named.values()):
        return 2
    return 0


@CLI
@given(output=st.one_of(st.none(), st.sampled_from(OUTPUT_NAMES)),
       html=st.one_of(st.none(), st.sampled_from(OUTPUT_NAMES)),
       trace=st.one_of(st.none(), st.sampled_from(OUTPUT_NAMES)),
       existing=st.sets(st.sampled_from(["r.json", "t.json"])), force=st.booleans())
@example(output="r.json", html=None, trace="r.json", existing=set(), force=False)  # -o s.json --trace s.json
@example(output="r.json", html=None, trace="./r.json", existing=set(), force=True)
@example(output="r.html", html="r.html", trace=None, existing=set(), force=False)
def test_profile_output_options_together_end_cleanly(cli_env, tmp_path_factory, output, html, trace, existing, force):
    folder = tmp_path_factory.mktemp("outputs")
    (folder / "sub").mkdir()
    for name in existing:
        (folder / name).write_text("keep")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    args = ["profile", "--seq-len", "32", "--heads", "1", "--kv-heads", "1", "--head-dim", "16", "--device", "cpu",
            "--backends", "pbs", "--budget", "0", "--iters", "1", "--warmup", "0", "--block-size", "16",
            "--segment-size", "32", "--recall-rows", "2", "--json"]
    for option, name in (("-o", output), ("--html", html), ("--trace", trace)):
        if name is not None:
            args += [option, str(folder / name)]
    if force:
        args.append("--force")
    result = invoke(args, env=cli_env)
    assert_clean_outcome(result, {0, 2})
    expected = _expected_output_code(output, html, trace, existing, force)
    assert result.exit_code == expected, f"exit {result.exit_code}, expected {expected}: {result.stderr[-300:]}"
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if expected == 2:
        assert after == before, "a refused command wrote or changed a file"
    else:
        written = {Path(os.path.normpath(n)).name for n in (output, html, trace) if n is not None}
        assert set(after) == set(before) | written
        assert all(after[n] != b"keep" for n in written)


# -- the CLI: PBS_* kernel settings (pbs_cli/options.py: check_kernel_settings) ------------------------------

_SETTING_VALUES = {"PBS_BACKEND": ["auto", "reference", "triton", "TRITON", "Reference"],
                   "PBS_PERM_MODE": ["auto", "remap", "gather", "tma", "ws", "persistent", "TMA"],
                   "PBS_CUDA_GRAPHS": ["0", "1", "yes", "true", "2"], "PBS_AUTOTUNE": ["0", "1", "on"]}
_ACCEPTED = {"PBS_BACKEND": {"auto", "reference", "triton"}, "PBS_PERM_MODE": {"auto", "remap", "gather", "tma",
             "persistent"}, "PBS_CUDA_GRAPHS": {"0", "1"}, "PBS_AUTOTUNE": {"0", "1"}}
env_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)


@CLI
@given(values=st.fixed_dictionaries({}, optional={name: st.one_of(st.sampled_from(choices), st.just(""), env_text)
                                                  for name, choices in _SETTING_VALUES.items()}))
@example(values={"PBS_BACKEND": "bogus"})
@example(values={"PBS_BACKEND": "triton"})
@example(values={"PBS_PERM_MODE": "bogus", "PBS_CUDA_GRAPHS": "maybe"})
def test_kernel_settings_are_checked_before_every_command(saved_profile, cli_env, tmp_path_factory, values):
    """Unknown values: exit 2 naming the variable; PBS_BACKEND=triton without a GPU or the interpreter: exit 3;
    `pbs env` runs whatever they are and lists both kinds of problem."""
    import torch

    path = tmp_path_factory.mktemp("settings") / "run.json"
    path.write_text(json.dumps(saved_profile), encoding="utf-8")
    env = {**cli_env, **{name: None for name in _SETTING_VALUES}, **values, "TRITON_INTERPRET": None}
    bad = [n for n, v in values.items() if v != "" and (v.lower() if n == "PBS_BACKEND" else v) not in _ACCEPTED[n]]
    triton_nowhere = values.get("PBS_BACKEND", "").lower() == "triton" and not torch.cuda.is_available()
    expected = 2 if bad else (3 if triton_nowhere else 0)
    result = invoke(["report", "show", str(path), "--format", "json"], env=env)
    assert_clean_outcome(result)
    assert result.exit_code == expected, f"exit {result.exit_code}, expected {expected}: {result.stderr[-300:]}"
    if bad:
        assert any(n in result.stderr for n in bad), result.stderr
    shown = invoke(["env", "--json"], env=env)
    assert_clean_outcome(shown, {0})
    assert set(json.loads(shown.stdout)["kernel_setting_problems"]) == set(bad) | ({"PBS_BACKEND"} if triton_nowhere
                                                                                   else set())


# -- the CLI: values the option parser refuses ---------------------------------------------------------------

int_text = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["", "x", "1.5", "one", "3x", "--", "1e3"]))


@CLI
@given(iters=int_text, warmup=int_text, recall=int_text)
@example(iters="0", warmup="0", recall="1")  # --iters 0
def test_profile_integer_options_end_in_a_result_or_one_line(cli_env, iters, warmup, recall):
    def ok(text: str, low: int) -> bool:
        return re.fullmatch(r"-?[0-9]+", text) is not None and int(text) >= low

    result = invoke(["profile", "--seq-len", "32", "--heads", "1", "--kv-heads", "1", "--head-dim", "16", "--device",
                     "cpu", "--backends", "pbs", "--budget", "0", "--block-size", "16", "--segment-size", "32",
                     f"--iters={iters}", f"--warmup={warmup}", f"--recall-rows={recall}", "--json"], env=cli_env)
    assert_clean_outcome(result, {0, 2})
    valid = ok(iters, 1) and ok(warmup, 0) and ok(recall, 1)
    assert result.exit_code == (0 if valid else 2), result.stderr[-300:]
    if not valid:
        assert len(result.stderr.strip().splitlines()) == 1, "one line, no usage panel"


# -- presets: any single [pbs] value --------------------------------------------------------------------------

toml_values = st.one_of(st.booleans(), st.integers(-300, 600), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(alphabet="abcdefghijklmnopqrstuvwxyz", max_size=6),
                        st.lists(st.integers(-2, 40), max_size=3))


@given(key=st.sampled_from([f.name for f in dataclasses.fields(PBSConfig)] + ["bogus"]), value=toml_values)
@example(key="threshold", value="high")
def test_a_preset_value_of_any_type_gives_a_config_or_names_file_and_key(tmp_path_factory, key, value):
    from pbs_cli.engine import presets

    folder = tmp_path_factory.mktemp("presets")
    path = folder / "mine.toml"
    lines = [ln for ln in presets.render_profile(PBSConfig()).splitlines() if not ln.startswith(f"{key} =")]
    path.write_text("\n".join([*lines, f"{key} = {presets._toml_value(value)}"]) + "\n", encoding="utf-8")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PBS_CONFIG_DIR", str(folder))
            config, _ = presets.resolve_config("mine")
    except UsageError as exc:
        message = str(exc)
        assert str(path) in message and key in message, message
        assert "\n" not in message
    else:
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(config, key) == expected
