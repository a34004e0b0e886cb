"""Tensor-parallel prefill (``--tp N``): 2 gloo ranks on the CPU against one process, launch plumbing,
and the refusals (indivisible heads, mismatched world size).

The 2-rank runs start real processes through ``pbs_cli.engine.distributed.launch`` (the engine behind
``torchrun --standalone``); each costs a few seconds of interpreter start-up per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pbs_cli.engine import distributed
from pbs_cli.errors import PBSError, UsageError

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "tp_worker.py")
sys.path.insert(0, str(HERE))

from fixtures import build_tiny_model_dir  # noqa: E402
import tp_worker  # noqa: E402

SEQ = 512  # 32 blocks of 16 tokens, 16 segments of 32: the sparse path with real choices to make


@pytest.fixture(scope="module")
def model_4q2kv(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny42"), seed=3, max_position_embeddings=2048)


def _one_process(model_dir: Path, dtype: torch.dtype):
    """Logits (1, SEQ, vocab) as fp64 and per-layer (kept, causal) block counts of a single-process run."""
    from transformers import AutoModelForCausalLM

    from pbs_cli.engine import integration
    from pbs_kernels import PBSConfig

    integration.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="pbs")
    ids = tp_worker.input_ids(model.config.vocab_size, SEQ)
    with torch.inference_mode(), integration.pbs_run(PBSConfig(**tp_worker.PBS)) as run:
        logits = model(ids).logits.double()
    return logits, [(int(s._kept), s._total) for s in run.recorder.prefill_layers()]


def test_two_gloo_ranks_match_one_process(model_4q2kv, tmp_path):
    from safetensors.torch import load_file

    code = distributed.launch(2, [WORKER, "logits", str(model_4q2kv), str(tmp_path), str(SEQ)])
    assert code == 0
    meta = json.loads((tmp_path / "tp.json").read_text())
    tp_logits = load_file(str(tmp_path / "tp.safetensors"))["logits"].double()

    # the heads really were split: 2 of 4 query heads per rank, every layer took the sparse path
    assert meta["world"] == 2 and meta["backend"] == "gloo"
    assert meta["local_q_heads"] == 2 and meta["sum_local_q_heads"] == 4
    assert meta["paths"] == ["pbs", "pbs"]

    ref64, counts64 = _one_process(model_4q2kv, torch.float64)
    one32, counts32 = _one_process(model_4q2kv, torch.float32)
    # density merged over ranks = the one-process density (same heads, same selection)
    assert list(zip(meta["kept"], meta["total"])) == [tuple(c) for c in counts32]
    assert counts32 == counts64, "fp32 and fp64 selected different blocks; the tolerance rule needs one plan"
    assert all(0 < k < t for k, t in counts32), "the comparison needs a truly sparse plan"
    # each rank counted its own half of the causal blocks
    assert [t for _, t in meta["rank0_local"]] == [t // 2 for _, t in counts32]

    # tolerance rule: err(TP fp32 vs fp64) <= 2 * err(one-process fp32 vs fp64) + floor
    err_tp = (tp_logits - ref64).abs().max().item()
    err_one = (one32 - ref64).abs().max().item()
    assert tp_logits.shape == ref64.shape
    assert err_tp <= 2 * err_one + 1e-5, (err_tp, err_one)


def test_launch_reports_failed_rank_and_only_rank0_prints(capfd):
    code = distributed.launch(2, [WORKER, "fail", "1", "7"])
    out, err = capfd.readouterr()
    assert code == 7
    assert "stdout from rank 0" in out and "stdout from rank 1" not in out
    assert "rank 1 of 2 failed (exit code 7): boom on rank 1" in err


def test_cli_prefill_tp2_reports_once_with_merged_density(model_4q2kv, tmp_path):
    """`pbs prefill --tp 2` re-launches itself on 2 gloo ranks: one JSON record (rank 0), the same
    density per layer as one process, and the tensor-parallel size in the record."""
    import inspect
    import os
    import subprocess

    from typer.testing import CliRunner

    from pbs_cli.app import app

    doc = tmp_path / "doc.py"
    doc.write_text(Path(inspect.getsourcefile(json.decoder)).read_text()[:2500])
    args = ["prefill", str(doc), "--model", str(model_4q2kv), "--truncate", "--block-size", "32",
            "--segment-size", "64", "--threshold", "0.7", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "pbs_cli", *args, "--tp", "2"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tp = json.loads(proc.stdout)  # exactly one JSON object: ranks != 0 print nothing
    assert proc.stderr.count("model: ") == 1
    one = json.loads(CliRunner().invoke(app, args).stdout)
    assert tp["tensor_parallel"] == {"size": 2, "backend": "gloo"}
    assert tp["prompt_tokens"] == one["prompt_tokens"] > 512
    assert [ly["path"] for ly in tp["layers"]] == ["pbs", "pbs"]
    assert [ly["density"] for ly in tp["layers"]] == pytest.approx([ly["density"] for ly in one["layers"]], abs=1e-9)
    assert 0 < tp["density"] < 1


def test_cli_refuses_tp2_for_9_query_3_kv_heads(tmp_path):
    from typer.testing import CliRunner

    from pbs_cli.app import app

    model = build_tiny_model_dir(tmp_path / "m93", num_attention_heads=9, num_key_value_heads=3, hidden_size=144,
                                 head_dim=16)
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 50)
    result = CliRunner().invoke(app, ["prefill", str(doc), "--model", str(model), "--tp", "2"])
    assert result.exit_code == 2
    assert "9 query heads and 3 KV heads" in result.stderr and "sizes that work: 1" in result.stderr


# -- refusals and plumbing (no processes) --------------------------------------------------


def test_valid_sizes_are_common_divisors():
    assert distributed.valid_tp_sizes(9, 3) == [1, 3]
    assert distributed.valid_tp_sizes(32, 8) == [1, 2, 4, 8]
    assert distributed.valid_tp_sizes(32, 8, 128256, 14336) == [1, 2, 4, 8]
    assert distributed.valid_tp_sizes(12, 4, 50) == [1, 2]


def test_embedded_model_shape_refuses_tp2_and_names_sizes_that_work():
    from transformers import LlamaConfig

    # SmolLM2-135M: 9 query heads, 3 KV heads, vocabulary 49152, MLP 1536
    cfg = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, vocab_size=49152,
                      intermediate_size=1536)
    with pytest.raises(UsageError) as info:
        distributed.check_model_config(2, cfg, "SmolLM2-135M-Instruct")
    msg = str(info.value)
    assert "--tp 2" in msg and "9 query heads and 3 KV heads" in msg and "sizes that work: 1, 3" in msg
    assert info.value.exit_code == 2
    distributed.check_model_config(3, cfg)  # divides: no error
    distributed.check_model_config(1, cfg)


def test_vocabulary_must_divide_too():
    with pytest.raises(UsageError, match=r"vocabulary size \(50\).*sizes that work: 1, 2"):
        distributed.check_tp_size(4, 8, 4, 50, 0, extra_names=("vocabulary size", "MLP width"))


def test_tp_must_match_the_launcher_world(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.needs_launch(2)
    with pytest.raises(UsageError, match=r"--tp 4 but torchrun started 2 processes"):
        distributed.tp_context(4)


def test_tp_outside_a_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.needs_launch(2) and not distributed.needs_launch(1) and not distributed.needs_launch(None)
    assert distributed.tp_context(None).size == 1 and distributed.is_main_rank()
    with pytest.raises(PBSError, match="needs 2 processes"):
        distributed.tp_context(2)
    assert distributed.reduce_max([1.0, 2.0]) == [1.0, 2.0] and distributed.load_kwargs_for_tp(1) == {}


def test_child_env_keeps_multicast_off_and_respects_the_caller():
    env = distributed.child_env(2, {"PATH": "/bin", "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "5"})
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["OMP_NUM_THREADS"] == "5" and env["PATH"] == "/bin"
    assert int(distributed.child_env(2, {})["OMP_NUM_THREADS"]) >= 1


def test_torchrun_command_for_docs():
    assert distributed.torchrun_command(2, ["prefill", "my doc.txt", "--tp", "2"]) == (
        "torchrun --nproc-per-node=2 --standalone -m pbs_cli prefill 'my doc.txt' --tp 2")
    assert "--nnodes=2 --rdzv-backend=c10d" in distributed.torchrun_command(8, ["prefill", "d"], nnodes=2)


def test_merge_profile_records_whole_model_from_rank_halves(monkeypatch):
    """Two ranks' records of one length -> slowest time, mean density/recall, min recall, all-head TFLOP/s,
    speedup against the best merged dense backend; a backend skipped on one rank is skipped."""
    import torch.distributed as dist

    from pbs_cli.engine.profile_records import result

    def rank_recs(rank):
        t = 10.0 + rank  # rank 1 is slower
        return [
            result(4096, "sdpa-flash", median_ms=2 * t, attend_ms=2 * t, density=1.0, tflops=1.0, tflops_computed=1.0),
            result(4096, "pbs", median_ms=t, attend_ms=t / 2, permute_ms=0.1 * t, select_ms=0.2, density=0.2 + 0.2 * rank,
                   recall_mean=0.9 + 0.05 * rank, recall_min=0.5 + 0.3 * rank, rel_l2_error=0.03 + 0.01 * rank,
                   tflops=2.0, tflops_computed=0.8, repeats=5 + rank),
            result(4096, "flex", status="skipped", reason="no flex here") if rank else
            result(4096, "flex", median_ms=3.0, density=0.2),
        ]

    monkeypatch.setattr(distributed, "_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [rank_recs(0), rank_recs(1)]))
    merged = {r["backend"]: r for r in distributed.merge_profile_records(rank_recs(0))}

    pbs, flash = merged["pbs"], merged["sdpa-flash"]
    assert pbs["median_ms"] == 11.0 and pbs["attend_ms"] == 5.5 and pbs["permute_ms"] == pytest.approx(1.1)
    assert pbs["density"] == pytest.approx(0.3) and pbs["recall_mean"] == pytest.approx(0.925)
    assert pbs["recall_min"] == 0.5 and pbs["repeats"] == 5
    assert pbs["rel_l2_error"] == pytest.approx(((0.03**2 + 0.04**2) / 2) ** 0.5)
    # FLOPs: rank r did tflops * time; all of it over the slowest time
    assert pbs["tflops"] == pytest.approx((2.0 * 10 + 2.0 * 11) / 11)
    assert pbs["tflops_computed"] == pytest.approx((0.8 * 5 + 0.8 * 5.5) / 5.5)
    assert flash["median_ms"] == 22.0 and pbs["best_dense"] == "sdpa-flash" and pbs["speedup"] == pytest.approx(2.0)
    assert merged["flex"]["status"] == "skipped" and merged["flex"]["reason"] == "no flex here"


def test_profile_refuses_tp_that_does_not_divide_heads():
    from typer.testing import CliRunner

    from pbs_cli.app import app

    result = CliRunner().invoke(app, ["profile", "--heads", "12", "--kv-heads", "4", "--tp", "8"])
    assert result.exit_code == 2
    assert "12 query heads and 4 KV heads" in result.stderr and "sizes that work: 1, 2, 4" in result.stderr
