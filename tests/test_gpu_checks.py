"""``benchmarks/gpu_checks.sh``, the script that runs the GPU-only tests and measurements: valid bash, and
each part it names in its usage exists (an unknown part is refused with the list)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_checks.sh"


def test_script_parses_and_names_its_parts(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    usage = set(re.findall(r"gpu_checks\.sh (\w+) OUT", text))
    cases = set(re.findall(r"^(\w+)\)$", text, flags=re.M))
    assert usage == cases == {"kernels", "speed", "eval", "prefill"}
    run = subprocess.run(["bash", str(SCRIPT), "nosuchpart", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "kernels, speed, eval or prefill" in run.stderr
