"""The engine: what the commands run (prefill, models, presets, profiling, workloads, mask analysis, timing,
traces, records). Nothing here reads command-line options or prints results; the commands and render/ do.
"""
