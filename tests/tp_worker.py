"""One rank of the tensor-parallel tests (tests/test_tp.py); started by ``pbs_cli.engine.distributed.launch``.

    tp_worker.py logits MODEL_DIR OUT_DIR SEQ_LEN   rank 0 writes OUT_DIR/tp.safetensors and OUT_DIR/tp.json
    tp_worker.py fail RANK CODE                      every rank prints a line; rank RANK fails with exit CODE

Both modes go through ``distributed.tp_context`` (gloo on CPU) like the ``pbs`` commands do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pbs_cli.engine import distributed

# the PBS parameters of the comparison: small blocks so a short sequence has many segments to select from
PBS = dict(block_size=16, segment_size=32, threshold=0.6)


def input_ids(vocab: int, n: int):
    import torch

    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1234))


def logits_mode(model_dir: str, out_dir: str, n: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pbs_cli.engine import integration
    from pbs_kernels import PBSConfig

    info = distributed.tp_context(None, "auto")
    integration.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="pbs",
                                                 **distributed.load_kwargs_for_tp(info.size))
    attn = model.model.layers[0].self_attn
    local_q = attn.q_proj.weight.to_local().shape[0] // attn.head_dim if hasattr(attn.q_proj.weight, "to_local") \
        else attn.q_proj.weight.shape[0] // attn.head_dim
    ids = input_ids(model.config.vocab_size, n)
    with torch.inference_mode(), integration.pbs_run(PBSConfig(**PBS)) as run:
        logits = model(ids).logits
    layers = run.recorder.prefill_layers()
    local = [(int(s._kept), s._total) for s in layers]
    distributed.merge_layer_stats(layers)
    all_local_q = distributed.reduce_sum(float(local_q))
    if distributed.is_main_rank():
        out = Path(out_dir)
        save_file({"logits": logits.float().contiguous()}, str(out / "tp.safetensors"))
        (out / "tp.json").write_text(json.dumps({
            "world": info.size, "backend": info.backend, "local_q_heads": local_q, "sum_local_q_heads": all_local_q,
            "paths": [s.path for s in layers], "kept": [int(s._kept) for s in layers],
            "total": [s._total for s in layers], "rank0_local": local}))


def fail_mode(rank_to_fail: int, code: int) -> None:
    info = distributed.tp_context(None, "auto")
    print(f"stdout from rank {info.rank}", flush=True)
    distributed.barrier()
    if info.rank == rank_to_fail:
        print(f"error: boom on rank {info.rank}", file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "logits":
        logits_mode(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "fail":
        fail_mode(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
