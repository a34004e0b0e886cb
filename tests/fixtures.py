"""Shared test fixtures: tiny offline models and hostile model files.

Nothing here downloads anything. ``build_tiny_model_dir`` writes a random-weight ``LlamaForCausalLM``
(safetensors) and a byte-level BPE tokenizer trained in code, so any byte sequence tokenizes. It is
small enough that a forward over a few thousand tokens takes well under a second on a CPU.

Use from a test module::

    from fixtures import tiny_model_dir  # noqa: F401  (a session-scoped pytest fixture)

Tiny model shape: 2 layers, 4 query heads, 2 KV heads, head_dim 16, ``TINY_CONTEXT`` positions.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

TINY_CONTEXT = 256  # max_position_embeddings of the tiny model (= one default 256-token segment)
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_HIDDEN = 64
EOS = "<|endoftext|>"

_CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 20,
    "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20,
    "import os, sys\nfor i in range(10):\n    print(i)\n" * 20,
]


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer (every byte sequence encodes), saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    fast.save_pretrained(path)
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=vocab_size, hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
                  num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS,
                  num_key_value_heads=TINY_KV_HEADS, max_position_embeddings=TINY_CONTEXT,
                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_model_dir(path: Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny Llama (safetensors) and its tokenizer into ``path``; return ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               **config_overrides)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_model_of(path: Path, model_cls_name: str, config_cls_name: str, **config_fields) -> Path:
    """A tiny random model of another architecture (e.g. ``"GPT2LMHeadModel"``, ``"GPT2Config"``) with the
    same tokenizer; for fallback / refusal tests."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls_name)(vocab_size=len(tok), **config_fields)
    model = getattr(transformers, model_cls_name)(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


# -- hostile model files --------------------------------------------------------------------------


def write_truncated_gguf(path: Path, keep: int = 40) -> Path:
    """A file that starts like a GGUF (magic, version 3, counts that promise tensors and metadata) and
    then stops after ``keep`` bytes."""
    header = b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 12) + struct.pack("<Q", 24)
    # first metadata key: "general.architecture" = "llama" (string type 8), then cut short
    key = b"general.architecture"
    header += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", 5) + b"llama"
    Path(path).write_bytes(header[:keep])
    return Path(path)


def write_garbage_gguf(path: Path, size: int = 4096, seed: int = 1) -> Path:
    """Random bytes with a .gguf name (no magic at all)."""
    import random

    rng = random.Random(seed)
    Path(path).write_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
    return Path(path)


def corrupt_safetensors_in(model_dir: Path) -> Path:
    """Truncate every ``*.safetensors`` file in ``model_dir`` to half its size (header intact, data cut)."""
    for f in Path(model_dir).glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return Path(model_dir)


def garble_safetensors_header_in(model_dir: Path) -> Path:
    """Overwrite the JSON header of every ``*.safetensors`` with junk of the same length."""
    for f in Path(model_dir).glob("*.safetensors"):
        data = bytearray(f.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        data[8 : 8 + n] = b"{" * n
        f.write_bytes(bytes(data))
    return Path(model_dir)


def pickle_only_model_dir(src_dir: Path, dst_dir: Path) -> Path:
    """Copy config/tokenizer of ``src_dir`` and store the weights only as ``pytorch_model.bin`` (a pickle
    that, if ever unpickled, writes a marker file ``PICKLE_RAN`` next to itself)."""
    import shutil

    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(src_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst_dir / f.name)
    marker = dst_dir / "PICKLE_RAN"
    payload = _MarkerPickle(str(marker))
    import pickle

    with open(dst_dir / "pytorch_model.bin", "wb") as fh:
        pickle.dump(payload, fh)
    return dst_dir


class _MarkerPickle:
    """Unpickling this object creates a file: proof that a loader ran a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- pytest fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A session-wide tiny Llama directory (read-only by convention: copy it before corrupting)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def offline_env(monkeypatch, tmp_path):
    """No network, no user config, a private HF cache and PBS cache: tests never touch the real ones."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("PBS_CONFIG_DIR", str(tmp_path / "pbs-config"))
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path / "pbs-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``python -m pbs_cli`` subprocess: offline, private caches, CPU interpreter."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               PBS_CONFIG_DIR=str(tmp_path / "pbs-config"), PBS_CACHE_DIR=str(tmp_path / "pbs-cache"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), PYTHONUNBUFFERED="1")
    env.setdefault("TRITON_INTERPRET", "1")
    env.update(extra)
    return env


PBS = [sys.executable, "-m", "pbs_cli"]


def parse_jsonl(path: Path) -> list[dict]:
    """Every line of ``path`` as JSON; raises on a torn or partial line."""
    text = Path(path).read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path} ends mid-line: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- running the CLI in-process -------------------------------------------------------------------

DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 130}


def invoke(args: list[str], input: bytes | str | None = None, env: dict[str, str] | None = None):
    """Run ``pbs ARGS`` in-process with Typer's CliRunner (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from pbs_cli.app import app

    return CliRunner().invoke(app, args, input=input, env=env)


def assert_clean_outcome(result, allowed: set[int] | None = None) -> None:
    """The run ended in a result or one clear error: a documented exit code, no escaped exception, no
    traceback; on failure the last stderr line is the one ``error:`` line (options the parser refused
    included: no boxed usage panel)."""
    allowed = DOCUMENTED_EXIT_CODES if allowed is None else allowed
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"exception escaped the command boundary: {exc!r}"
    assert result.exit_code in allowed, (f"exit code {result.exit_code}, expected one of {sorted(allowed)}; "
                                         f"stderr: {result.stderr[-800:]}")
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-2000:]
    if result.exit_code != 0:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: "), (
            f"exit {result.exit_code} without an 'error:' line; stderr: {result.stderr[-800:]}")
        assert sum(ln.startswith("error: ") for ln in lines) == 1, result.stderr
        assert len(lines[-1]) < 2000, f"error line too long ({len(lines[-1])} chars)"
        assert "Usage:" not in result.stderr and "╭" not in result.stderr, f"a usage panel: {result.stderr[-800:]}"


# -- a tiny GGUF (for the dequantization cache) ---------------------------------------------------


def build_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama as a GGUF file (fp32 tensors, a GPT-2 style BPE tokenizer in the metadata)
    that transformers loads with ``from_pretrained(dir, gguf_file=...)``, like the embedded model."""
    import gguf
    import numpy as np

    path = Path(path)
    scratch = path.with_suffix(".tokenizer")
    tok = build_tokenizer(scratch)
    backend = json.loads((scratch / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = backend["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    eos = tok.convert_tokens_to_ids(EOS)

    rng = np.random.default_rng(seed)
    head_dim = TINY_HIDDEN // TINY_HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(TINY_CONTEXT)
    w.add_embedding_length(TINY_HIDDEN)
    w.add_block_count(TINY_LAYERS)
    w.add_feed_forward_length(2 * TINY_HIDDEN)
    w.add_head_count(TINY_HEADS)
    w.add_head_count_kv(TINY_KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    def tensor(name: str, *shape: int) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32) if len(shape) > 1 else np.ones(shape, np.float32)
        w.add_tensor(name, data)

    h, f, kv = TINY_HIDDEN, 2 * TINY_HIDDEN, TINY_KV_HEADS * head_dim
    tensor("token_embd.weight", len(tokens), h)
    tensor("output_norm.weight", h)
    for i in range(TINY_LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", h)
        tensor(f"blk.{i}.attn_q.weight", h, h)
        tensor(f"blk.{i}.attn_k.weight", kv, h)
        tensor(f"blk.{i}.attn_v.weight", kv, h)
        tensor(f"blk.{i}.attn_output.weight", h, h)
        tensor(f"blk.{i}.ffn_norm.weight", h)
        tensor(f"blk.{i}.ffn_gate.weight", f, h)
        tensor(f"blk.{i}.ffn_up.weight", f, h)
        tensor(f"blk.{i}.ffn_down.weight", h, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A session-wide tiny GGUF file (copy it before corrupting or touching it)."""
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")
