"""pbs: Permuted Block-Sparse Attention for long-context prefill — the command-line application."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pbs-attn")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
