"""The engine: what the commands run (prefill, models, presets, profiling, workloads, mask analysis, timing,
traces, records). Nothing here parses command-line options or prints results (progress and warnings go to
stderr): the commands call it, and render/ shows what it returns.
"""
