"""`pbs prefill`'s record as a Rich table on stdout, and what its speedup does not show by itself."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..console import out


def speedup_caveat(rec: dict) -> str:
    """What the speedup of a ``--compare-dense`` record does not show by itself: that both passes ran
    the same dense forward (every layer dense), or that the PBS and dense times overlap over the runs
    (the difference is within their run-to-run spread). Empty otherwise."""
    summary = rec["layer_summary"]
    if summary["sparse_layers"] == 0 and summary["dense_layers"] > 0:
        return " (both passes ran the same dense forward: the difference is run-to-run spread)"
    t, d = rec["prefill_ms_all"], rec["dense_prefill_ms_all"]
    if len(t) > 1 and len(d) > 1 and min(t) <= max(d) and min(d) <= max(t):
        return " (within the run-to-run spread of the two: their min-max ranges overlap)"
    return ""


def _spread(times: list[float], unit: str) -> str:
    """'  (min a, max b over n runs)' for a list of pass times in ms, in ``unit``; empty for a single run."""
    if len(times) < 2:
        return ""
    return f"  (min {_fmt_ms(min(times), unit)}, max {_fmt_ms(max(times), unit)} over {len(times)} runs)"


def _other_params(config: dict[str, Any]) -> str:
    """', name value' for every further PBS parameter that differs from its default."""
    from pbs_kernels import PBSConfig

    shown = {"block_size", "segment_size", "threshold", "permute", "sink", "local_blocks", "dense_below"}
    defaults = PBSConfig().to_dict()
    extra = [f"{k} {v}" for k, v in config.items() if k not in shown and (k not in defaults or defaults[k] != v)]
    return "".join(f", {e}" for e in extra)


def _unit(*ms: float) -> str:
    """One unit for times shown together: seconds once any of them reaches 10 s, else milliseconds."""
    return "s" if max(ms) >= 1e4 else "ms"


def _fmt_ms(ms: float, unit: str | None = None) -> str:
    return f"{ms / 1e3:.2f} s" if (unit or _unit(ms)) == "s" else f"{ms:.1f} ms"


def print_summary(rec: dict[str, Any]) -> None:
    table = Table(title=f"pbs prefill: {rec['document']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    m = rec["model"]
    table.add_row("model", f"{m['spec']} -> {m['name']} ({m['kind']}: {m['path']})")
    table.add_row("device / dtype", f"{rec['device']} / {rec['dtype']}")
    if rec.get("tensor_parallel", {}).get("size", 1) > 1:
        table.add_row("tensor parallel", f"{rec['tensor_parallel']['size']} ranks "
                      f"({rec['tensor_parallel']['backend']}); times are the slowest rank's, density covers all heads")
    toks = f"{rec['prompt_tokens']}"
    if rec["truncated"]:
        toks += f" (truncated from {rec['document_tokens']})"
    table.add_row("prompt tokens", toks)
    unit = _unit(rec["prefill_ms"], rec.get("dense_prefill_ms") or 0.0)  # the PBS and dense rows alike
    table.add_row("prefill time", _fmt_ms(rec["prefill_ms"], unit) + _spread(rec["prefill_ms_all"], unit)
                  + ("  [--compile: norms, RoPE and MLP compiled; attention eager]" if rec.get("compiled") else ""))
    table.add_row("throughput", f"{rec['tokens_per_s']:,.0f} tokens/s")
    c = rec["config"]
    table.add_row("PBS parameters", f"profile {rec['profile']}: block {c['block_size']}, segment {c['segment_size']}, "
                  f"threshold {c['threshold']}, permute {c['permute']}, sink {c['sink']}, "
                  f"local_blocks {c['local_blocks']}, dense_below {c['dense_below']}" + _other_params(c))
    s = rec["layer_summary"]
    if s["density"] is not None:
        table.add_row("density", f"{rec['density']:.1%} overall; "
                      f"per layer {s['density_min']:.1%} - {s['density_max']:.1%}"
                      f" ({s['sparse_layers']} sparse, {s['dense_layers']} dense)")
    from pbs_kernels.graphs import GRAPHS_BELOW

    kernels = sorted({ly["kernel"] for ly in rec["layers"] if ly.get("kernel")})
    on_triton = any(k.startswith("triton/") for k in kernels)
    if kernels:
        note = " (sparse layers; PBS_PERM_MODE overrides the read mode)" if on_triton else " (sparse layers)"
        table.add_row("attention kernel", ", ".join(kernels) + note)
    if rec.get("cuda_graph_layers"):
        table.add_row("CUDA graphs", f"{rec['cuda_graph_layers']} sparse layers replayed from one captured layer "
                      "(PBS_CUDA_GRAPHS=0 turns this off)")
    elif on_triton and rec["prompt_tokens"] >= GRAPHS_BELOW:
        table.add_row("CUDA graphs", f"none: layers of {GRAPHS_BELOW:,} tokens or more keep the GPU busy "
                      "longer than their launches take (PBS_CUDA_GRAPHS=1 captures them anyway)")
    dense_reasons = sorted({ly["reason"] for ly in rec["layers"] if ly["path"] == "dense"})
    if dense_reasons:
        table.add_row("dense because", "; ".join(dense_reasons))
    if "dense_prefill_ms" in rec:
        backend = (rec.get("dense_sdpa") or {}).get("backend", "PyTorch's choice")
        table.add_row("dense SDPA prefill",
                      f"{_fmt_ms(rec['dense_prefill_ms'], unit)} ({backend})"
                      + _spread(rec["dense_prefill_ms_all"], unit))
        table.add_row("speedup", f"{rec['speedup']:.2f}x vs dense SDPA" + speedup_caveat(rec))
        table.add_row("top-1 agreement", f"{rec['top1_agreement']:.2%} of {rec['prompt_tokens']} positions")
        table.add_row("mean KL(dense||pbs)", f"{rec['mean_kl']:.4f} nats")
    c = rec.get("continuation")
    if c:
        table.add_row("continued", f"last {c['tokens']} tokens over the KV cache of a PBS prefill of "
                      f"{c['prefix_tokens']}, dense attention: top-1 {c['top1_agreement']:.2%}, mean KL "
                      f"{c['mean_kl']:.4f} nats, perplexity {c['ppl']:.3f} vs {c['ppl_dense']:.3f} dense "
                      f"({c['ppl_increase']:+.1%})")
    g = rec.get("generation")
    if g:
        table.add_row("generated", f"{len(g['token_ids'])} tokens in {_fmt_ms(g['decode_ms'])}: {g['text']!r}")
    out.print(table)
