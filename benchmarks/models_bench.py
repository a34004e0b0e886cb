"""Prefill of a few decoder layers of real model shapes: PBS against the fastest dense SDPA in the same run.

Random weights, built from transformers' config classes with the published sizes (nothing is downloaded):
Qwen3-8B (every layer global), Mistral-7B with its 4096-token sliding window (every layer a band plan),
Gemma-3-12B (five local layers with a 1024-token window, then one global). Each model is its base class
(no LM head: logits of 128K tokens over a 262K vocabulary would not fit), ``--layers`` decoder layers
(default: two; one 5:1 period, six, for Gemma-3), run over N random token ids.

Per model and length: the forward with the "pbs" attention (one ``pbs_run`` per forward, as ``pbs prefill``
runs it: the PBS parameters of ``--profile``, CUDA graphs as configured), then the forward with dense
attention on every SDPA backend that can run it ("pbs_dense": transformers' SDPA attention restricted to one
backend; sliding-window layers get transformers' N x N window mask there). Times are medians of CUDA
events (wall clock on CPU) after ``--warmup`` untimed forwards. The table names the fastest dense backend,
the speed-up over it, and the density of the global and the sliding-window layers. For models with
sliding windows a last column times plain causal SDPA with the windows dropped: not the model's output,
but what the fastest SDPA kernels (which take no window; flash takes no mask at all) cost on that shape.

    python benchmarks/models_bench.py                          # H100: 32K and 128K, bf16
    python benchmarks/models_bench.py --models mistral-7b --lengths 32k --json out.json
    python benchmarks/models_bench.py --tiny --device cpu      # a scaled-down run that checks the script

``--tiny`` keeps each model's layer pattern and window-to-length ratio at toy sizes (lengths 256 and 512 by
default): a check that the script runs end to end, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "kernels", ROOT / "profiles"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from pbs_cli.engine.sizes import parse_size  # noqa: E402


@dataclass(frozen=True)
class ModelShape:
    """A decoder family at a published size: the base model class, its config class and fields."""

    name: str
    model_class: str
    config_class: str
    fields: dict[str, Any]
    layers: int
    tiny: dict[str, Any] = field(default_factory=dict)  # fields replaced by --tiny


def gemma3_layer_types(layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]


MODELS = {  # sizes from the models' published config.json files
    "qwen3-8b": ModelShape(
        "Qwen3-8B", "Qwen3Model", "Qwen3Config",
        dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=151936, rms_norm_eps=1e-6),
        layers=2, tiny=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, vocab_size=512)),
    "mistral-7b": ModelShape(
        "Mistral-7B (4K window)", "MistralModel", "MistralConfig",
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=32000, sliding_window=4096),
        layers=2, tiny=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, vocab_size=512, sliding_window=32)),
    "gemma-3-12b": ModelShape(
        "Gemma-3-12B", "Gemma3TextModel", "Gemma3TextConfig",
        dict(hidden_size=3840, intermediate_size=15360, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
             query_pre_attn_scalar=256, vocab_size=262208, sliding_window=1024),
        layers=6, tiny=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=64, query_pre_attn_scalar=64, vocab_size=512, sliding_window=8)),
}
LENGTHS = ("32k", "128k")
TINY_LENGTHS = ("256", "512")


def build(shape: ModelShape, layers: int, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The base model with random weights, on ``device`` in ``dtype``, attention "pbs"."""
    import transformers

    fields = {**shape.fields, **(shape.tiny if tiny else {})}
    if shape.config_class == "Gemma3TextConfig":
        fields["layer_types"] = gemma3_layer_types(layers)
    config = getattr(transformers, shape.config_class)(num_hidden_layers=layers, max_position_embeddings=1 << 18,
                                                       **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, shape.model_class)(config)
    return model.to(dtype).eval()


def timed(forward, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``forward()``: CUDA events on a GPU, wall clock on a CPU."""
    from pbs_cli.engine.timing import bench

    return bench(forward, device, warmup=warmup, min_repeats=iters, max_repeats=iters, memory=False).median_ms


def dense_times(model, ids, config, device, dtype, warmup: int, iters: int,
                window_ignored: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms of the dense forward ("pbs_dense") on every SDPA backend that runs it; why the others did not.
    ``window_ignored``: plain causal SDPA in every layer with any sliding window dropped (``plain_causal``): what
    dense attention would cost with the fastest SDPA kernels, which take no window (a reference for the windowed
    models, not their output)."""
    from pbs_cli.engine import dense_sdpa, integration

    attn = model.config
    heads, kv_heads = attn.num_attention_heads, attn.num_key_value_heads
    head_dim = getattr(attn, "head_dim", None) or attn.hidden_size // heads
    candidates = dense_sdpa.GPU_CANDIDATES if device.type == "cuda" else ("sdpa-flash", "sdpa-math")
    integration.set_attention(model, integration.DENSE_NAME)
    times, skipped = {}, {}
    for name in candidates:
        mode, reason = dense_sdpa.probe_sdpa(name, device, dtype, heads, kv_heads, head_dim)
        if mode is None:
            skipped[name] = reason or "cannot run"
            continue
        choice = dense_sdpa.DenseChoice(name, mode, strict=True)

        def forward(choice=choice):
            with torch.no_grad(), integration.pbs_run(config, dense=choice, plain_causal=window_ignored):
                model(ids)

        try:
            times[name] = timed(forward, device, warmup, iters)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. no kernel for the window's mask
            skipped[name] = str(exc).splitlines()[0][:160]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return times, skipped


def pbs_time(model, ids, config, device, warmup: int, iters: int) -> tuple[float, list[dict[str, Any]]]:
    """Median ms of the "pbs" forward, and the per-layer records of one of them."""
    from pbs_cli.engine import integration

    integration.set_attention(model, integration.NAME)
    layers: list[dict[str, Any]] = []

    def forward():
        with torch.no_grad(), integration.pbs_run(config) as run:
            model(ids)
        layers[:] = [s.to_dict() for s in run.recorder.prefill_layers()]

    return timed(forward, device, warmup, iters), layers


def mean_density(layers: list[dict[str, Any]], sliding: bool) -> float | None:
    """Mean density of the PBS layers that are (or are not) sliding-window layers."""
    values = [layer["density"] for layer in layers
              if layer["path"] == "pbs" and layer["reason"].startswith("sliding window") == sliding]
    return statistics.fmean(values) if values else None


def measure(key: str, n: int, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from pbs_cli.engine import presets

    shape = MODELS[key]
    layers = args.layers or shape.layers
    model = build(shape, layers, args.tiny, device, dtype)
    config, profile = presets.resolve_config(args.profile, device=str(device), threshold=args.threshold)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    pbs_ms, per_layer = pbs_time(model, ids, config, device, args.warmup, args.iters)
    times, skipped = dense_times(model, ids, config, device, dtype, args.warmup, args.iters)
    best = min(times, key=times.__getitem__) if times else None
    windowed = any(layer["reason"].startswith("sliding window") for layer in per_layer)
    causal = dense_times(model, ids, config, device, dtype, args.warmup, args.iters, True)[0] if windowed \
        else {}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": shape.name, "key": key, "seq_len": n, "layers": per_layer, "profile": profile,
            "config": config.to_dict(), "pbs_ms": pbs_ms, "dense_ms": times, "dense_skipped": skipped,
            "best_dense": best, "speedup": times[best] / pbs_ms if best else None, "window_ignored_ms": causal,
            "density_global": mean_density(per_layer, False), "density_sliding": mean_density(per_layer, True)}


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fastest(times: dict[str, float]) -> str:
    if not times:
        return "-"
    name = min(times, key=times.__getitem__)
    return f"{times[name]:.1f} ({name})"


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown(records: list[dict[str, Any]], env: dict[str, Any], argv: list[str], dtype: torch.dtype) -> str:
    gpu = env["gpu"]
    card = f"{gpu['name']} (CUDA {gpu['cuda']})" if gpu else f"CPU, {env['cpu_threads']} threads"
    lines = [f"{card}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
             f"{str(dtype).removeprefix('torch.')}; commit {commit()}; "
             f"command: python benchmarks/models_bench.py {' '.join(argv)}", "",
             "| model | N | PBS layers: global / sliding (dense) | PBS ms | density global / sliding "
             "| best dense SDPA ms | speed-up | other dense backends | causal SDPA, window ignored ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        sparse = [layer for layer in r["layers"] if layer["path"] == "pbs"]
        n_sliding = sum(layer["reason"].startswith("sliding window") for layer in sparse)
        n_dense = len(r["layers"]) - len(sparse)
        best = r["best_dense"]
        others = ", ".join([f"{k} {v:.1f}" for k, v in r["dense_ms"].items() if k != best]
                           + [f"{k}: {why}" for k, why in r["dense_skipped"].items()]) or "-"
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {len(sparse) - n_sliding} / {n_sliding} ({n_dense}) "
            f"| {r['pbs_ms']:.1f} "
            f"| {fmt(r['density_global'], '{:.1%}')} / {fmt(r['density_sliding'], '{:.1%}')} "
            f"| {fmt(r['dense_ms'].get(best), '{:.1f}')} ({best or 'none'}) | {fmt(r['speedup'], '{:.2f}x')} "
            f"| {others} | {fastest(r['window_ignored_ms'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--lengths", nargs="+", default=None, help="prompt lengths, e.g. 32k 128k (default)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2; 6 for Gemma-3)")
    parser.add_argument("--profile", default=None, help="PBS preset (default: pbs prefill's choice for the device)")
    parser.add_argument("--threshold", type=float, default=None, help="override the preset's threshold")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script, measures nothing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = parser.parse_args(argv)

    from pbs_cli.engine import integration
    from pbs_cli.engine.reports import atomic_write_text, environment

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    integration.register()
    lengths = [parse_size(x) for x in (args.lengths or (TINY_LENGTHS if args.tiny else LENGTHS))]
    env = environment()
    records = []
    for key in args.models:
        for n in lengths:
            r = measure(key, n, args, device, dtype)
            records.append(r)
            print(f"{key} N={n}: pbs {r['pbs_ms']:.1f} ms, dense {r['dense_ms']}, density global "
                  f"{fmt(r['density_global'], '{:.1%}')} / sliding {fmt(r['density_sliding'], '{:.1%}')}",
                  file=sys.stderr, flush=True)
            if args.json is not None:  # after every record: a run stopped early keeps what it measured
                atomic_write_text(args.json, json.dumps({"env": env, "commit": commit(), "argv": argv,
                                                         "records": records}, indent=2))
    print(markdown(records, env, argv, dtype))
    return 0



if __name__ == "__main__":
    sys.exit(main())
