"""Model families verified with the "pbs" attention, and what runs sparse in each.

Each family here has a test (tests/test_model_families.py) on a tiny random-weight model built from its
transformers config class: at threshold 1.0 the output equals the family's own eager attention, and below
1.0 every layer takes the PBS path. Global layers run PBS selection; sliding-window layers run band plans
(``pbs_kernels.band``: the blocks the window touches, exact at any threshold); soft-capped logits are
capped inside the attention kernel. Other decoder families whose attention is plain causal usually work
too (``pbs prefill`` reports each layer's path), but are not listed until tested.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GLOBAL = "every layer: PBS selection"
SLIDING_OPTIONAL = ("every layer: PBS selection; with sliding_window set, every layer runs a band plan of that "
                    "window instead")


@dataclass(frozen=True)
class Family:
    """A verified family: its name, the transformers ``model_type`` values it covers, the causal-LM
    class its test builds, and what runs sparse."""

    name: str
    model_types: tuple[str, ...]
    architecture: str
    sparse: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_types"] = list(self.model_types)
        return d


FAMILIES: tuple[Family, ...] = (
    Family("Llama 3.x", ("llama",), "LlamaForCausalLM", GLOBAL),
    Family("Qwen2.5", ("qwen2",), "Qwen2ForCausalLM",
           "every layer: PBS selection; with use_sliding_window, the sliding layers (from max_window_layers on) "
           "run band plans"),
    Family("Qwen3", ("qwen3",), "Qwen3ForCausalLM",
           "every layer: PBS selection; with use_sliding_window, the sliding layers run band plans"),
    Family("Mistral", ("mistral",), "MistralForCausalLM", SLIDING_OPTIONAL),
    Family("Mixtral", ("mixtral",), "MixtralForCausalLM", SLIDING_OPTIONAL),
    Family("Phi-3", ("phi3",), "Phi3ForCausalLM", SLIDING_OPTIONAL),
    Family("Gemma-2", ("gemma2",), "Gemma2ForCausalLM",
           "global layers: PBS selection; local (sliding-window) layers: band plans; logits soft-capped in the "
           "kernel"),
    Family("Gemma-3", ("gemma3_text",), "Gemma3ForCausalLM",
           "global layers: PBS selection; local (sliding-window) layers: band plans"),
    Family("gpt-oss", ("gpt_oss",), "GptOssForCausalLM",
           "global layers: PBS selection; sliding-window layers: band plans; learned attention sinks applied in "
           "the kernel"),
)

