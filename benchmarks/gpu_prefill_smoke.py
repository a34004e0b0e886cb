"""GPU smoke benchmark of `pbs prefill` through transformers on a SmolLM2-shaped model.

The real embedded model cannot travel to the GPU machine (no network there), so this builds a
random-weight Llama with SmolLM2-135M's attention shape (30 layers, 9 query / 3 KV heads, head_dim 64,
hidden 576) and a small byte-level tokenizer, then runs the CLI on standard-library text. Random
weights: the timings and the code path are real, the fidelity numbers are not meaningful.

    python benchmarks/gpu_prefill_smoke.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures import build_tokenizer  # noqa: E402


def main(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=131072,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
