"""Rendering: results as Rich tables, report formats (JSON, JSONL, CSV, Markdown, HTML) and pictures."""
