"""Tensor-parallel prefill (``--tp N``) through ``torch.distributed``, launched the way ``torchrun`` does.

PBS attention is computed per head, so tensor parallelism needs no code of its own in the kernels:
transformers' tensor-parallel plan (``DistributedConfig(tp_plan="auto")``, the model's own
``base_model_tp_plan``) shards q/k/v column-wise and o_proj row-wise, each rank's attention function
receives only its local heads ``(B, H_q / N, L, D)`` and ``(B, H_kv / N, L, D)``, and transformers does the
all-reduce after o_proj. This module only launches the ranks and merges what they measured.

How a command uses it (``pbs prefill`` / ``pbs profile``)::

    if distributed.needs_launch(tp):              # `--tp 2` typed by a user: re-run under torchrun's engine
        distributed.check_model_config(tp, config, name)   # refuse indivisible heads before spawning
        distributed.relaunch(tp)                  # never returns: exits with the ranks' exit code
    info = distributed.tp_context(tp, device)     # inside each rank: process group, device, quiet ranks != 0
    model = from_pretrained(..., **distributed.load_kwargs_for_tp(info.size))
    ...
    times = distributed.reduce_max(times)         # per-run max over ranks
    distributed.merge_layer_stats(layers)         # kept / causal block counts summed over all heads
    if distributed.is_main_rank(): print / write reports

Launch: ``--tp N`` outside torchrun starts N local processes through ``torch.distributed.launcher``
(the engine behind ``torchrun --standalone``) running ``python -m pbs_cli <same arguments>``. Inside
torchrun (``WORLD_SIZE`` set, e.g. a multi-node job started with torchrun's rendezvous flags) nothing is
re-launched and the world size is the tensor-parallel size. Child processes get
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` unless
already set (NVLink multicast stays off on shared machines).

Backends: NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import PBSError, UnsupportedError, UsageError

# environment every child process gets (unless the caller's environment already sets them)
CHILD_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# set by `launch` for its children: ranks != 0 write their stderr to <dir>/rank<R>.log
LOG_DIR_ENV = "PBS_TP_LOG_DIR"


@dataclass(frozen=True)
class TPInfo:
    """Where this process stands in a tensor-parallel run (size 1 = not distributed)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None  # "nccl" | "gloo" | None
    device: str = "cpu"  # this rank's device: "cuda:<local_rank>" or "cpu"

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "backend": self.backend}


# -- validation (no process group needed) ----------------------------------------------------


def valid_tp_sizes(num_heads: int, num_kv_heads: int, *extra_dims: int) -> list[int]:
    """Tensor-parallel sizes that divide the query heads, the KV heads and every extra dimension given
    (e.g. vocabulary and MLP width), ascending. (9, 3) -> [1, 3]; (32, 8) -> [1, 2, 4, 8]."""
    g = math.gcd(num_heads, num_kv_heads)
    for d in extra_dims:
        if d:
            g = math.gcd(g, d)
    return [n for n in range(1, g + 1) if g % n == 0]


def check_tp_size(tp: int, num_heads: int, num_kv_heads: int, *extra_dims: int, name: str = "the model",
                  extra_names: Sequence[str] = ()) -> None:
    """Raise UsageError unless ``tp`` divides the heads (and ``extra_dims``), naming the sizes that work."""
    if tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    if tp == 1:
        return
    valid = valid_tp_sizes(num_heads, num_kv_heads, *extra_dims)
    works = ", ".join(map(str, valid))
    if valid != valid_tp_sizes(num_heads, num_kv_heads):
        dims = ", ".join(f"{label} {d}" for label, d in zip(extra_names, extra_dims) if d)
        alone = ", ".join(map(str, valid_tp_sizes(num_heads, num_kv_heads)))
        works += f" (the heads alone would allow {alone}; {dims} limit it)"
    if num_heads % tp or num_kv_heads % tp:
        raise UsageError(
            f"--tp {tp} does not divide the heads of {name}: {num_heads} query heads and {num_kv_heads} KV heads "
            f"must both be multiples of the tensor-parallel size; sizes that work: {works}")
    labels = list(extra_names) + [f"dimension {i}" for i in range(len(extra_names), len(extra_dims))]
    for label, d in zip(labels, extra_dims):
        if d and d % tp:
            raise UsageError(f"--tp {tp} does not divide the {label} ({d}) of {name}; sizes that work: {works}")


def model_dims(config: Any) -> tuple[int, int, int, int]:
    """(query heads, KV heads, vocabulary, MLP width) of a transformers config (its text part)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return heads, kv, int(getattr(cfg, "vocab_size", 0) or 0), int(getattr(cfg, "intermediate_size", 0) or 0)


def check_model_config(tp: int, config: Any, name: str = "the model") -> None:
    """Refuse ``--tp`` sizes the model cannot be sharded by (heads; vocabulary and MLP width, which
    transformers 5.17 needs divisible too)."""
    heads, kv, vocab, inter = model_dims(config)
    check_tp_size(tp, heads, kv, vocab, inter, name=name, extra_names=("vocabulary size", "MLP width"))


def check_launch_environment(tp: int, device: str = "auto", device_map: str | None = None) -> None:
    """Refuse combinations that cannot run: more ranks than GPUs, ``--device cpu`` on a CUDA machine
    (transformers puts tensor-parallel shards on the accelerator), ``--device-map`` together with ``--tp``."""
    if tp <= 1:
        return
    import torch

    if device_map:
        raise UsageError(f"--tp {tp} and --device-map {device_map} are exclusive: --tp shards every layer over "
                         "the GPUs, --device-map places whole layers; use one")
    if torch.cuda.is_available():
        if device.strip().lower() == "cpu":
            raise UnsupportedError(f"--tp {tp} with --device cpu on a machine with CUDA: transformers places "
                                   "tensor-parallel shards on the GPUs; use --device auto (or hide the GPUs with "
                                   "CUDA_VISIBLE_DEVICES= to run on the CPU)")
        if device.strip().lower().startswith("cuda:"):
            raise UsageError(f"--tp {tp} uses cuda:0..cuda:{tp - 1}, one GPU per rank; drop --device {device} "
                             "(choose GPUs with CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        if tp > count and not under_launcher():
            raise UnsupportedError(f"--tp {tp} needs {tp} GPUs (one per rank) but this machine has {count}; "
                                   f"use --tp {count} or fewer, or torchrun across nodes (see the README)")
    elif device.strip().lower().startswith("cuda"):
        raise UnsupportedError(f"--device {device}: torch sees no CUDA device; use --device auto or cpu")


# -- launching ------------------------------------------------------------------------------


def under_launcher() -> bool:
    """True inside a process started by torchrun / ``launch`` (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if under_launcher() else 1


def needs_launch(tp: int | None) -> bool:
    """``--tp N`` with N > 1 typed outside torchrun: the command must re-run itself on N ranks."""
    return bool(tp and tp > 1 and not under_launcher())


def child_env(nproc: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of launched ranks: ``base`` (default os.environ) plus ``CHILD_ENV`` defaults and,
    on CPU, a fair share of the cores for each rank's OpenMP threads (torchrun would set 1)."""
    env = dict(os.environ if base is None else base)
    for key, value in CHILD_ENV.items():
        env.setdefault(key, value)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def torchrun_command(nproc: int, argv: Sequence[str], nnodes: int = 1) -> str:
    """The torchrun command line equivalent to ``pbs <argv>`` on ``nproc`` ranks (for messages and docs)."""
    import shlex

    head = ["torchrun", f"--nproc-per-node={nproc}"]
    head += ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                                                  "--rdzv-endpoint=HOST:29500", "--rdzv-id=JOB"]
    return " ".join(head + ["-m", "pbs_cli"] + [shlex.quote(a) for a in argv])


def _tail(path: Path, lines: int = 3) -> str:
    """The error line a failed rank printed (its last ``error:`` line), else its last ``lines`` lines."""
    try:
        text = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors_seen = [ln for ln in text if ln.startswith("error:")]
    if errors_seen:
        return errors_seen[-1].removeprefix("error:").strip()
    return " | ".join(text[-lines:])


def launch(nproc: int, args: Sequence[str], *, python_args: Sequence[str] = ("-u",),
           env: dict[str, str] | None = None, debug: bool = False) -> int:
    """Run ``python <python_args> <args>`` on ``nproc`` local ranks (torchrun --standalone) and wait.

    Returns the exit code to report: 0 when every rank succeeded, else rank 0's code when it failed
    (it has already printed its own error line), else the first failed rank's code after printing
    the end of that rank's stderr. Ctrl-C stops every rank and returns 130.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not debug:  # the agent logs every worker start/stop at INFO/WARNING; the ranks speak for themselves
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    log_dir = Path(tempfile.mkdtemp(prefix="pbs-tp-"))
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(child_env(nproc, env if env is not None else saved))
    os.environ[LOG_DIR_ENV] = str(log_dir)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)(*python_args, *args)
        return 0
    except ChildFailedError as exc:
        failures = exc.failures
        if 0 in failures and failures[0].exitcode > 0:
            return int(failures[0].exitcode)
        # a rank that exited with an error code is the cause; ranks killed by a signal were usually
        # stopped by the launcher after that failure, whichever finished first
        errored = [r for r, f in failures.items() if f.exitcode > 0]
        rank = min(errored) if errored else min(failures)
        code = failures[rank].exitcode
        detail = _tail(log_dir / f"rank{rank}.log")
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        print(f"error: rank {rank} of {nproc} failed ({how})" + (f": {detail}" if detail else ""), file=sys.stderr)
        return code if code > 0 else 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - e.g. SignalException when the agent is told to stop
        if type(exc).__name__ == "SignalException":
            return 130
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(log_dir, ignore_errors=True)


def relaunch(tp: int, argv: Sequence[str] | None = None) -> None:
    """Re-run this very command (``sys.argv[1:]`` by default, ``--tp`` kept) on ``tp`` ranks; exits with
    their exit code (raises ``typer.Exit``, which every command boundary passes through)."""
    import typer

    from ..console import debug_enabled

    args = list(sys.argv[1:] if argv is None else argv)
    code = launch(tp, ["-m", "pbs_cli", *args], debug=debug_enabled())
    raise typer.Exit(code)


# -- inside a rank --------------------------------------------------------------------------

_state: dict[str, Any] = {"info": TPInfo()}


def _quiet_other_ranks(rank: int) -> None:
    """Ranks != 0: stdout to /dev/null; stderr to $PBS_TP_LOG_DIR/rank<R>.log when `launch` started us
    (the launcher shows it if that rank fails), else left alone (torchrun's --local-ranks-filter / --tee)."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir and Path(log_dir).is_dir():
        fd = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)


def tp_context(tp: int | None = None, device: str = "auto") -> TPInfo:
    """Join the tensor-parallel group when running under a launcher; a size-1 ``TPInfo`` otherwise.

    ``tp`` is the ``--tp`` option (None when not given); under a launcher it must equal ``WORLD_SIZE``
    (None means "the whole world"). Initializes the default process group (NCCL with this rank's GPU
    bound on CUDA, gloo on CPU) once, and silences stdout of ranks != 0. Idempotent.
    """
    current: TPInfo = _state["info"]
    if current.active:
        return current
    world = env_world_size()
    if world <= 1:
        if tp and tp > 1:
            raise PBSError(f"--tp {tp} needs {tp} processes; start it with `pbs ... --tp {tp}` (which launches "
                           f"them) or `torchrun --nproc-per-node={tp} -m pbs_cli ...`")
        return current
    if tp is not None and tp != world:
        raise UsageError(f"--tp {tp} but torchrun started {world} processes (WORLD_SIZE); pass --tp {world} "
                         "or leave --tp out under torchrun")
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.strip().lower() == "cpu" and torch.cuda.is_available():
        raise UnsupportedError("--tp with --device cpu on a machine with CUDA is not supported; use --device auto")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UnsupportedError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                   "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        backend, dev = "nccl", f"cuda:{local_rank}"
    else:
        backend, dev = "gloo", "cpu"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": torch.device(dev)} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    info = TPInfo(size=world, rank=rank, local_rank=local_rank, backend=backend, device=dev)
    _state["info"] = info
    if rank != 0:
        _quiet_other_ranks(rank)
    import atexit

    atexit.register(shutdown)
    return info


def current() -> TPInfo:
    return _state["info"]


def is_main_rank() -> bool:
    """True on rank 0 and in every non-distributed run: the one process that prints and writes files."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _state["info"] = TPInfo()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(values: Sequence[float], op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return t.tolist()


def reduce_max(x):
    """Max over ranks of a float or a list of floats (element-wise; every rank must pass the same length).
    Identity outside a distributed run."""
    if not _distributed():
        return x
    if isinstance(x, (int, float)):
        return _all_reduce([float(x)], "max")[0]
    return _all_reduce(list(x), "max")


def reduce_sum(x):
    """Sum over ranks of a float or a list of floats (element-wise). Identity outside a distributed run."""
    if not _distributed():
        return x
    if isinstance(x, (int, float)):
        return _all_reduce([float(x)], "sum")[0]
    return _all_reduce(list(x), "sum")


def merge_layer_stats(stats: Iterable[Any]) -> None:
    """Make per-layer densities cover the heads of every rank, in place.

    Each ``integration.LayerStat`` of a sparse call holds this rank's kept block count (``_kept``, a
    tensor) and causal block count (``_total``) over its local heads; after this call they hold the
    sums over all ranks, so ``density`` = kept / causal over all heads of the model. Every rank must
    pass the same layers in the same order (they run the same forward). No-op outside a distributed run.
    """
    stats = list(stats)
    if not _distributed():
        return
    import torch

    sparse = [s for s in stats if getattr(s, "_kept", None) is not None]
    counts = reduce_sum([float(v) for s in sparse for v in (s._kept.item(), s._total)])
    for i, s in enumerate(sparse):
        s._kept = torch.tensor(counts[2 * i])
        s._total = int(counts[2 * i + 1])


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_rank_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others after it; no collectives inside."""
    main = is_main_rank()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def load_kwargs_for_tp(n: int) -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments for a tensor-parallel load on ``n`` ranks ({} for n <= 1).

    ``DistributedConfig(tp_size=n, tp_plan="auto")`` applies the model's own ``base_model_tp_plan``
    (transformers >= 5.17); the model lands on this rank's device, so do not ``.to()`` it or pass
    ``device_map``. Call after ``tp_context`` so the process group exists.
    """
    if n <= 1:
        return {}
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=n, tp_plan="auto")}


# -- attention-only profiling (`pbs profile --tp N`): each rank times its own heads ------------


def local_heads(q, k, v, info: TPInfo | None = None):
    """This rank's heads, as transformers' column-wise plan shards them: contiguous chunks of H_q / N query
    heads and H_kv / N KV heads (each query group keeps its KV head). q (B, H_q, N, D), k/v (B, H_kv, N, D)."""
    info = info or current()
    if not info.active:
        return q, k, v
    hq, hk = q.shape[1] // info.size, k.shape[1] // info.size
    r = info.rank
    return (q[:, r * hq:(r + 1) * hq].contiguous(), k[:, r * hk:(r + 1) * hk].contiguous(),
            v[:, r * hk:(r + 1) * hk].contiguous())


_MAX_FIELDS = ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "permute_ms", "select_ms", "attend_ms",
               "peak_mem_mib")
_MEAN_FIELDS = ("density", "recall_mean")


def merge_profile_records(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge ``pbs profile`` result records of all ranks (each timed its own heads) into whole-model records.

    Per (seq_len, layer, backend): times and peak memory are the slowest rank's; density and mean recall the
    mean over ranks (exact: every rank has as many heads of the same length); minimum recall the minimum;
    relative L2 error the root mean square; TFLOP/s the FLOPs of all heads over the slowest time; speedups are
    recomputed against the best merged dense backend. A record skipped on any rank is skipped. Collective:
    every rank must call it once per length. Identity outside a distributed run.
    """
    if not _distributed():
        return recs
    import torch.distributed as dist

    gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, recs)
    key = lambda r: (r["seq_len"], r.get("layer"), r["backend"])  # noqa: E731
    by_rank = [{key(r): r for r in rank_recs or []} for rank_recs in gathered]
    merged: list[dict[str, Any]] = []
    for rec in recs:
        parts = [m[key(rec)] for m in by_rank if key(rec) in m]
        bad = next((p for p in parts if p["status"] != "ok"), None)
        if bad is not None or len(parts) != len(by_rank):
            merged.append(dict(bad if bad is not None else rec, status="skipped",
                               reason=(bad or {}).get("reason") or "not run on every rank"))
            continue
        m = dict(rec)
        for f in _MAX_FIELDS:
            vals = [p[f] for p in parts if p.get(f) is not None]
            m[f] = max(vals) if vals else None
        for f in _MEAN_FIELDS:
            vals = [p[f] for p in parts if p.get(f) is not None]
            m[f] = sum(vals) / len(vals) if len(vals) == len(parts) else None
        vals = [p["recall_min"] for p in parts if p.get("recall_min") is not None]
        m["recall_min"] = min(vals) if vals else None
        vals = [p["rel_l2_error"] for p in parts if p.get("rel_l2_error") is not None]
        m["rel_l2_error"] = math.sqrt(sum(x * x for x in vals) / len(vals)) if len(vals) == len(parts) else None
        vals = [p["repeats"] for p in parts if p.get("repeats") is not None]
        m["repeats"] = min(vals) if vals else None
        # FLOPs of rank r = tflops_r * time_r (time it was computed with); all heads over the slowest time
        for f, t in (("tflops", "median_ms"), ("tflops_computed", "attend_ms")):
            if all(p.get(f) is not None and p.get(t) for p in parts) and m.get(t):
                m[f] = sum(p[f] * p[t] for p in parts) / m[t]
        merged.append(m)
    # speedups against the best merged dense backend of each (seq_len, layer)
    from .profile_records import DENSE_BACKENDS

    for rec in merged:
        rec["speedup"], rec["best_dense"] = None, None
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in merged:
        groups.setdefault((rec["seq_len"], rec.get("layer")), []).append(rec)
    for group in groups.values():
        dense = [r for r in group if r["backend"] in DENSE_BACKENDS and r["status"] == "ok" and r.get("median_ms")]
        if not dense:
            continue
        best = min(dense, key=lambda r: r["median_ms"])
        for rec in group:
            if rec["status"] == "ok" and rec.get("median_ms"):
                rec["best_dense"], rec["speedup"] = best["backend"], best["median_ms"] / rec["median_ms"]
    return merged
