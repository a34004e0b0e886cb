"""Triton kernels (kernels/*.py hold only @triton.jit code) and their launchers."""
