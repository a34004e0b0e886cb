"""`pbs profile`: time PBS attention against the best dense attention on this machine, at one or many lengths."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from ..engine import distributed, presets, reports
from ..console import command_boundary, debug_enabled, err
from ..errors import INTERRUPTED, OutOfMemory, PBSError, UnsupportedError, UsageError
from ..options import BlockSize, Device, Dtype, Force, SegmentSize, Threshold, check_outputs
from ..engine.memory import free_memory_bytes
from ..engine.profile_records import BACKENDS, skipped, summarize
from ..render.report_formats import format_for_path, header_line, incomplete_line, render, result_line, rich_table
from ..engine.sizes import format_size, parse_sizes
from ..render.tables import print_table

if TYPE_CHECKING:
    from ..engine.profiling import Case, Profiler, Settings

# Llama-3.1-8B attention: 32 query heads, 8 KV heads, head_dim 128
DEFAULT_SHAPE = {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128}
DEFAULT_LENGTHS = {"cuda": "8k,32k,128k", "cpu": "1k,4k"}

HELP = (
    "Time PBS attention (permute / select / attend) against dense SDPA backends and FlexAttention on the same "
    "Q/K/V, at one or many sequence lengths; report density, speedup, error and recall.\n\n"
    "Q/K/V come from the structured synthetic generator (sinks, local windows, heavy-hitter keys, slash and topic "
    "heads; --pattern) or, with --from-model/--doc/--layers, from a real model's forward. Shapes: --model (its "
    "config only) or --heads/--kv-heads/--head-dim/--batch; default Llama-3.1-8B (32/8/128, batch 1). Lengths take "
    "k/m suffixes (128k = 131072). Unavailable backends and lengths that do not fit in memory are reported as "
    "skipped and the sweep goes on.\n\n"
    "On CUDA the pbs total is timed as a layer runs inside `pbs prefill`: below 64K tokens the copies of Q/K/V "
    "into a CUDA graph's buffers and one replay of permute + select + attend (PBS_CUDA_GRAPHS=0: eager launches; "
    "the eager total is in the row's notes), from 64K on eager launches (PBS_CUDA_GRAPHS=1: graphs there too); "
    "the phase times are eager, and there the attend phase makes its own K/V copy (a layer makes it in the "
    "selection's pooling pass).\n\n"
    "TFLOP/s dense-equivalent = causal FLOPs / time, causal FLOPs = 2*2*N^2*D*H_q*B/2 = 2*N^2*D*H_q*B; "
    "TFLOP/s computed = density * causal FLOPs / attend time. Speedup = time of the best dense SDPA backend at "
    "that length (named) / this backend's time. Break-even = smallest tested length where PBS beats it."
)


def parse_backends(text: str | None) -> tuple[str, ...]:
    if text is None:
        return BACKENDS
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or repr(text)}; valid: {', '.join(BACKENDS)}")
    return tuple(dict.fromkeys(names))


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --layers {text!r}; use comma-separated layer indices, e.g. 0,10,-1") from None
    if not layers:
        raise UsageError(f"no layers in --layers {text!r}")
    return list(dict.fromkeys(layers))


def shape_from_model(spec_text: str) -> tuple[dict[str, int], str]:
    """Attention shape from a model's config (no weights read). Returns (shape, description)."""
    from ..engine import models

    spec = models.resolve_model(spec_text)
    heads, kv, head_dim = models.attention_shape(models.ModelSource(spec).config())
    return {"batch": 1, "heads": heads, "kv_heads": kv, "head_dim": head_dim}, spec.describe()


class _Outputs:
    """Where results go: stdout format, -o file, --html file; JSONL lines are flushed per length."""

    def __init__(self, stdout_fmt: str | None, output: Path | None, html: Path | None):
        """The paths were checked (``options.check_outputs``); here: the formats they name."""
        self.stdout_fmt = stdout_fmt
        self.output, self.html = output, html
        self.file_fmt = format_for_path(output) if output is not None else None
        if html is not None and format_for_path(html) != "html":
            raise UsageError(f"--html {str(html)!r} must end in .html")
        self._jsonl: TextIO | None = None
        self.run_id = ""

    def start(self, doc: dict[str, Any]) -> None:
        self.run_id = str(doc["timestamp"])
        if self.stdout_fmt == "jsonl":
            sys.stdout.write(header_line(doc))
            sys.stdout.flush()
        if self.file_fmt == "jsonl":
            assert self.output is not None
            self._jsonl = open(self.output, "w", encoding="utf-8")
            self._jsonl.write(header_line(doc))
            self._flush()

    def _flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())

    def records(self, recs: list[dict[str, Any]]) -> None:
        """Called once per finished length."""
        lines = "".join(result_line(r, self.run_id) for r in recs)
        if self.stdout_fmt == "jsonl":
            sys.stdout.write(lines)
            sys.stdout.flush()
        if self._jsonl is not None:
            self._jsonl.write(lines)
            self._flush()

    def mark_incomplete(self, incomplete: dict[str, Any]) -> None:
        """The JSONL streams end in an ``"incomplete"`` record (the other formats carry it in the document)."""
        line = incomplete_line(incomplete, self.run_id)
        if self.stdout_fmt == "jsonl":
            sys.stdout.write(line)
            sys.stdout.flush()
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._flush()

    def finish(self, doc: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            err.print(f"saved {self.output}", highlight=False, markup=False)
        elif self.output is not None:
            reports.atomic_write_text(self.output, render(doc, self.file_fmt or "json"))
            err.print(f"saved {self.output}", highlight=False, markup=False)
        if self.html is not None:
            reports.atomic_write_text(self.html, render(doc, "html"))
            err.print(f"saved {self.html}", highlight=False, markup=False)
        if self.stdout_fmt in ("json", "csv", "markdown"):
            typer.echo(render(doc, self.stdout_fmt), nl=False)
        elif self.stdout_fmt is None:
            print_table(rich_table(doc))

    def discard_files(self) -> None:
        """Write no files: remove the JSONL file this run created, forget -o and --html."""
        if self._jsonl is not None:
            self._jsonl.close()
            Path(self._jsonl.name).unlink(missing_ok=True)
            self._jsonl = None
        self.output = self.html = None

    def close(self) -> None:
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()


def write_trace(path: Path, case: Case, settings: Settings) -> None:
    """One PBS pass under torch.profiler with ranges pbs.permute / pbs.select / pbs.attend; Chrome
    trace JSON (gzip-compressed when ``path`` ends in .gz), written atomically."""
    from torch.profiler import record_function

    from pbs_kernels.attention import pbs_attention
    from pbs_kernels.block_mask import PermutedBlockMask
    from pbs_kernels.permute import compute_permutation
    from pbs_kernels.select import select_blocks

    from ..engine import traces

    q, k, v = case.q, case.k, case.v
    cfg, scale = settings.config, settings.scale

    def one_pass() -> None:
        with record_function("pbs.permute"):
            perm = compute_permutation(q, k, cfg, scale)
        with record_function("pbs.select"):
            num, idx = select_blocks(q, k, perm, cfg, scale)
        with record_function("pbs.attend"):
            pbs_attention(q, k, v, PermutedBlockMask(perm, num, idx, cfg.block_size, cfg.segment_size, q.shape[2]), scale)

    traces.save(traces.record(one_pass, q.device), path)


@command_boundary
def command(
    seq_len: Annotated[str | None, typer.Option("--seq-len", "-n", help="Length or comma list, k/m suffixes "
                                                "(128k = 131072). Default: 8k,32k,128k on CUDA, 1k,4k on CPU.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Take heads / KV heads / head_dim from this "
                                              "model's config (alias, directory, .gguf, HF id); no weights are read.")] = None,
    heads: Annotated[int | None, typer.Option("--heads", min=1, help="Query heads (default 32).")] = None,
    kv_heads: Annotated[int | None, typer.Option("--kv-heads", min=1, help="KV heads (default 8).")] = None,
    head_dim: Annotated[int | None, typer.Option("--head-dim", min=8, help="Head dimension (default 128).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Batch size (default 1).")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="PBS preset name (see `pbs env`).")] = None,
    threshold: Threshold = None,
    block_size: BlockSize = None,
    segment_size: SegmentSize = None,
    backends: Annotated[str | None, typer.Option("--backends", "-b", help=f"Comma list of {', '.join(BACKENDS)} "
                                                 "(default: all; unavailable ones are reported as skipped; "
                                                 "naming only ones that cannot run on this device is exit 3).")]
    = None,
    pattern: Annotated[str, typer.Option("--pattern", help="Synthetic workload: mixed, sink, local, vertical, "
                                         "slash, topic, uniform.")] = "mixed",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic workload and the recall rows.")] = 0,
    from_model: Annotated[str | None, typer.Option("--from-model", help="Capture real post-RoPE Q/K/V from this "
                                                   "model's forward over --doc (loads the weights).")] = None,
    doc: Annotated[Path | None, typer.Option("--doc", help="UTF-8 text for --from-model.")] = None,
    layers: Annotated[str, typer.Option("--layers", help="Layers to capture with --from-model, e.g. 0,10,-1.")] = "0",
    warmup: Annotated[int | None, typer.Option("--warmup", min=0, help="Untimed calls before timing (default: 2 "
                                               "on CUDA, where the first call may autotune or compile; 1 on CPU).")] = None,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Minimum timed repeats.")] = 3,
    budget: Annotated[float, typer.Option("--budget", min=0.0, help="Seconds to spend per measurement "
                                          "(repeats adapt, at most 50).")] = 1.0,
    recall_rows: Annotated[int, typer.Option("--recall-rows", min=1, help="Query rows sampled for recall.")] = 32,
    reference_max_len: Annotated[int, typer.Option("--reference-max-len", min=1, help="Longest N to time the "
                                                   "plain-PyTorch reference at.")] = 16384,
    trace: Annotated[Path | None, typer.Option("--trace", help="Write a torch.profiler Chrome trace (.json or "
                                               ".json.gz) of one PBS pass at the last length.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    as_jsonl: Annotated[bool, typer.Option("--jsonl", help="Print JSON lines (header, then one per result, "
                                           "flushed per length).")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save to this file; format from the "
                                                "extension: .json .jsonl .csv .md .html.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also save an HTML report with plots.")] = None,
    force: Force = False,
    tp: Annotated[int | None, typer.Option("--tp", min=1, help="Tensor-parallel size: each of N ranks (one GPU "
                                           "each, re-launched through torch.distributed) times its H/N heads; "
                                           "times are the slowest rank's.")] = None,
) -> None:
    import torch

    from ..engine import models
    from ..engine.profiling import Profiler, Settings, input_bytes
    from ..engine.workloads import PATTERNS

    # -- validate everything before any work --
    chosen = [name for name, on in (("json", as_json), ("jsonl", as_jsonl), ("csv", as_csv), ("markdown", as_markdown)) if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one stdout format, got --{' --'.join(chosen)}")
    # -- tensor parallel (pbs_cli.engine.distributed): re-run on N ranks, each timing its own heads --
    distributed.check_launch_environment(tp or distributed.env_world_size(), device)
    tp_size = tp or distributed.env_world_size()
    if distributed.needs_launch(tp):
        _check_tp_shape(tp, model, heads, kv_heads, from_model)
        distributed.relaunch(tp)  # exits with the ranks' exit code
    tpi = distributed.tp_context(tp, device)
    dev = torch.device(models.resolve_device(device))
    torch_dtype = models.resolve_dtype(dtype, str(dev))
    sizes = parse_sizes(seq_len if seq_len is not None else DEFAULT_LENGTHS["cuda" if dev.type == "cuda" else "cpu"])
    if min(sizes) < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens, got {min(sizes)}")
    names = parse_backends(backends)
    if backends is not None:
        _check_backends_here(names, dev)
    if pattern not in PATTERNS:
        raise UsageError(f"unknown --pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    config, profile_name = presets.resolve_config(profile, device=str(dev), threshold=threshold,
                                                  block_size=block_size, segment_size=segment_size)
    check_outputs({"--output": output, "--html": html, "--trace": trace}, force)
    outputs = (_Outputs(chosen[0] if chosen else None, output, html) if tpi.is_main
               else _Outputs(None, None, None))  # tensor parallel: rank 0 alone writes
    if from_model is not None:
        if doc is None:
            raise UsageError("--from-model needs --doc FILE (the text to run the model on)")
        if any(x is not None for x in (model, heads, kv_heads, head_dim, batch)):
            raise UsageError("--model/--heads/--kv-heads/--head-dim/--batch do not apply with --from-model "
                             "(the captured tensors have the model's shape)")
        layer_list = parse_layers(layers)
    elif doc is not None:
        raise UsageError("--doc needs --from-model MODEL")

    shape = dict(DEFAULT_SHAPE)
    shape_source = "default (Llama-3.1-8B attention)"
    if model is not None:
        shape, shape_source = shape_from_model(model)
    for key, value in (("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim), ("batch", batch)):
        if value is not None:
            shape[key] = value
            shape_source = "flags" if model is None else shape_source + " with flags"
    if shape["heads"] % shape["kv_heads"]:
        raise UsageError(f"--heads ({shape['heads']}) must be a multiple of --kv-heads ({shape['kv_heads']})")
    distributed.check_tp_size(tp_size, shape["heads"], shape["kv_heads"], name=shape_source)

    if warmup is None:
        warmup = 2 if dev.type == "cuda" else 1
    settings = Settings(config=config, backends=names, warmup=warmup, iters=iters, budget_s=budget,
                        recall_rows=recall_rows, reference_max_len=reference_max_len, seed=seed,
                        explicit_backends=backends is not None)

    # -- captured workload: one forward at the longest length, prefixes for shorter ones --
    captured: dict[int, tuple] | None = None
    workload: dict[str, Any] = {"source": "synthetic", "pattern": pattern, "seed": seed}
    if from_model is not None:
        from ..engine.documents import read_document
        from ..engine.workloads import captured_qkv

        text, doc_name = read_document(str(doc))
        spec = models.resolve_model(from_model)
        err.print(f"model: {spec.describe()}", highlight=False, markup=False)
        models.quiet_transformers(debug_enabled())
        source = models.ModelSource(spec)
        ids = source.tokenizer()(text, add_special_tokens=True)["input_ids"]
        too_long = [n for n in sizes if n > len(ids)]
        if too_long:
            err.print(f"document has {len(ids)} tokens: skipping --seq-len {', '.join(map(format_size, too_long))}",
                      highlight=False, markup=False)
        sizes_run = [n for n in sizes if n <= len(ids)]
        if not sizes_run:
            raise UsageError(f"document {doc_name!r} has only {len(ids)} tokens, fewer than every --seq-len; "
                             "pass a longer document or a shorter --seq-len")
        longest = max(sizes_run)
        loaded = source.load(torch_dtype, str(dev), attn_implementation="sdpa")
        tokens = torch.tensor([ids[:longest]], device=loaded.model.device)
        with models.progress(f"capturing Q/K/V of layer(s) {','.join(map(str, layer_list))} over {longest} tokens"):
            try:
                captured = captured_qkv(loaded.model, tokens, layer_list)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        del loaded
        q0 = next(iter(captured.values()))[0]
        shape = {"batch": 1, "heads": q0.shape[1], "kv_heads": next(iter(captured.values()))[1].shape[1],
                 "head_dim": q0.shape[3]}
        shape_source = f"captured from {spec.name}"
        distributed.check_tp_size(tp_size, shape["heads"], shape["kv_heads"], name=spec.name)
        torch_dtype = q0.dtype
        workload = {"source": "model", "model": spec.to_dict(), "document": doc_name, "document_tokens": len(ids),
                    "layers": sorted(captured)}
    else:
        sizes_run = sizes

    doc_rec = reports.envelope(
        "profile", device=str(dev), dtype=str(torch_dtype).removeprefix("torch."),
        shape={**shape, "source": shape_source}, tensor_parallel=tpi.to_dict(), profile=profile_name, pbs=config.to_dict(), workload=workload,
        seq_lens=sizes, backends=list(names),
        measurement={"warmup": warmup, "min_repeats": iters, "budget_s": budget, "recall_rows": recall_rows,
                     "timer": "cuda events" if dev.type == "cuda" else "time.perf_counter"},
        results=[], summary={},
    )
    results: list[dict[str, Any]] = doc_rec["results"]
    outputs.start(doc_rec)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    task = progress.add_task("profiling", total=len(sizes))
    profiler = Profiler(settings, on_step=lambda s: progress.update(task, description=s))
    b, h, hk, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    traced = False
    try:
        with progress:
            for n in sizes:
                recs: list[dict[str, Any]] = []
                if n not in sizes_run:
                    recs = [skipped(n, x, "the document is shorter than this length") for x in names]
                else:
                    need = input_bytes(b, h, hk, n, d, torch_dtype) * (len(captured) if captured else 1)
                    free = free_memory_bytes(dev)
                    if captured is None and need > 0.9 * free:
                        reason = (f"inputs need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {dev.type}; "
                                  "try a shorter --seq-len or fewer heads")
                        err.print(f"skipping N={format_size(n)}: {reason}", highlight=False, markup=False)
                        recs = [skipped(n, x, reason) for x in names]
                    else:
                        recs = _run_length(n, captured, profiler, settings, shape, torch_dtype, dev, pattern, seed,
                                           trace if tpi.is_main else None)
                        traced = traced or (trace is not None and any(r["backend"] == "pbs" and r["status"] == "ok" for r in recs))
                recs = distributed.merge_profile_records(recs)  # tensor parallel: all heads, slowest rank
                for r in recs:  # a backend that ran out of memory or failed: say so now, the sweep goes on
                    why = r.get("reason") or ""
                    if r["status"] != "ok" and why.startswith(("out of memory", "failed:")):
                        where = format_size(n) + (f" layer {r['layer']}" if r.get("layer") is not None else "")
                        err.print(f"skipping {r['backend']} at N={where}: {why}", highlight=False, markup=False)
                results.extend(recs)
                outputs.records(recs)
                progress.advance(task)
    except KeyboardInterrupt:  # Ctrl-C: every finished length goes to every output, marked incomplete
        _interrupted(outputs, doc_rec, sizes)
    except BaseException:
        outputs.close()  # finished JSONL lines stay on disk
        raise
    doc_rec["summary"] = summarize(results)
    nothing_fit = bool(results) and all(
        r["status"] != "ok" and ("GiB" in (r.get("reason") or "") or "out of memory" in (r.get("reason") or ""))
        for r in results)
    if nothing_fit:
        # no report of nothing but failures: drop this run's JSONL file, write no -o/--html file
        outputs.discard_files()
    outputs.finish(doc_rec)
    if trace is not None:
        err.print(f"saved {trace}" if traced else "no trace written: pbs did not run at any length",
                  highlight=False, markup=False)
    if nothing_fit:
        raise OutOfMemory(f"no length fit in memory (tried {', '.join(map(format_size, sizes))}); try a shorter "
                          "--seq-len, fewer heads or --dtype bfloat16")


def _interrupted(outputs: _Outputs, doc: dict[str, Any], sizes: list[int]) -> None:
    """After Ctrl-C: write what finished to every requested output, marked ``incomplete`` (nothing when no
    length finished), then exit 130 with one line that says where it went."""
    done = list(dict.fromkeys(r["seq_len"] for r in doc["results"]))
    missing = [n for n in sizes if n not in done]
    if not done:
        outputs.discard_files()
        raise PBSError("interrupted before any length finished; nothing was written", INTERRUPTED)
    doc["incomplete"] = {"reason": "interrupted", "finished_seq_lens": done, "missing_seq_lens": missing}
    doc["summary"] = summarize(doc["results"])
    outputs.mark_incomplete(doc["incomplete"])
    outputs.finish(doc)
    kept = ", ".join(str(p) for p in (outputs.output, outputs.html) if p is not None) or "the output above"
    raise PBSError(f"interrupted after {len(done)} of {len(sizes)} lengths ({', '.join(map(format_size, done))}); "
                   f"they are in {kept}, marked incomplete", INTERRUPTED)


def _check_backends_here(names: tuple[str, ...], dev) -> None:
    """Named backends that cannot run on this device: all of them is exit 3 (nothing would be measured),
    some of them a warning (they are reported as skipped)."""
    from ..engine.profiling import unavailable_here

    missing = {name: why for name in names if (why := unavailable_here(name, dev))}
    if not missing:
        return
    listed = "; ".join(f"{name} {why}" for name, why in missing.items())
    if len(missing) == len(names):
        raise UnsupportedError(f"no --backends can run on {dev.type}: {listed}; name others (e.g. pbs,sdpa-math)")
    err.print(f"warning: {listed}: reported as skipped", highlight=False, markup=False)


def _check_tp_shape(tp: int, model: str | None, heads: int | None, kv_heads: int | None,
                    from_model: str | None) -> None:
    """Before launching ranks: refuse a --tp that does not divide the heads of the profiled shape."""
    from ..engine import models

    if from_model is not None:
        spec = models.resolve_model(from_model)
        h, hk, _, _ = distributed.model_dims(models.ModelSource(spec).config())
        name = spec.name
    else:
        h, hk, name = DEFAULT_SHAPE["heads"], DEFAULT_SHAPE["kv_heads"], "the default Llama-3.1-8B shape"
        if model is not None:
            shape, name = shape_from_model(model)
            h, hk = shape["heads"], shape["kv_heads"]
        if heads or kv_heads:
            h, hk, name = heads or h, kv_heads or hk, "--heads/--kv-heads"
    distributed.check_tp_size(tp, h, hk, name=name)


def _run_length(n: int, captured, profiler: Profiler, settings: Settings, shape: dict[str, int], dtype, dev,
                pattern: str, seed: int, trace: Path | None) -> list[dict[str, Any]]:
    """All cases of one length: generate (or slice) Q/K/V, run the profiler, optionally trace."""
    import torch

    from ..engine.profiling import Case, is_oom
    from ..engine.workloads import synthetic_qkv

    cases: list[Case] = []
    try:
        if captured is not None:
            for layer, (q, k, v) in captured.items():
                cases.append(Case(*distributed.local_heads(q[:, :, :n], k[:, :, :n], v[:, :, :n]), layer))
        else:
            q, k, v = synthetic_qkv(shape["batch"], shape["heads"], shape["kv_heads"], n, shape["head_dim"],
                                    seed=seed, dtype=dtype, device=dev, pattern=pattern)
            cases.append(Case(*distributed.local_heads(q, k, v)))  # tensor parallel: this rank's heads
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        cases.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        reason = f"out of memory while creating the inputs ({str(exc).splitlines()[0][:100]})"
        err.print(f"skipping N={format_size(n)}: {reason}", highlight=False, markup=False)
        return [skipped(n, x, reason) for x in settings.backends]
    recs: list[dict[str, Any]] = []
    for case in cases:
        recs.extend(profiler.run(case))
    if trace is not None and "pbs" in settings.backends and any(r["backend"] == "pbs" and r["status"] == "ok" for r in recs):
        write_trace(trace, cases[-1], settings)
    del cases
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return recs


command.__doc__ = HELP
