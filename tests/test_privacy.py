"""Privacy: `pbs env` and saved/printed reports never carry credentials from the environment, nor the
document's text unless the user asks for it with ``--include-text``."""

from __future__ import annotations

import json

import pytest

from fixtures import assert_clean_outcome, invoke, offline_env, tiny_model_dir  # noqa: F401  (pytest fixtures)

DOC_MARKER = "QuokkaMarker7f3a"
SECRETS = {
    "HF_TOKEN": "hf_secret_marker",
    "HUGGING_FACE_HUB_TOKEN": "hf_secret_marker_legacy",
    "OPENAI_API_KEY": "sk-secret-marker",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-marker",
    "GITHUB_TOKEN": "ghp_secret_marker",
    "WANDB_API_KEY": "wandb-secret-marker",
}
TEXT = ("def handler(request):\n    return respond(request)\n\n" * 3) + f"# {DOC_MARKER}\n" + "x = 1\n" * 5


@pytest.fixture()
def secret_env(offline_env, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return offline_env


def _assert_private(*texts: str, doc: bool = True) -> None:
    for text in texts:
        for name, value in SECRETS.items():
            assert value not in text, f"{name}'s value leaked: ...{text[max(0, text.find(value) - 80):][:200]}..."
        if doc:
            assert DOC_MARKER not in text, "document text leaked into the output"


@pytest.mark.parametrize("args", [["env", "--json"], ["env"]])
def test_env_never_shows_credentials(secret_env, args):
    result = invoke(args)
    assert_clean_outcome(result, {0})
    _assert_private(result.stdout, result.stderr, doc=False)
    assert "HF_TOKEN" not in result.stdout


def test_prefill_report_has_no_document_text_and_no_credentials(secret_env, tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.py"
    doc.write_text(TEXT, encoding="utf-8")
    report = tmp_path / "report.json"
    result = invoke(["prefill", str(doc), "--model", str(tiny_model_dir), "--json", "-o", str(report),
                     "--compare-dense", "--block-size", "16", "--segment-size", "32"])
    assert_clean_outcome(result, {0})
    saved = report.read_text(encoding="utf-8")
    _assert_private(result.stdout, result.stderr, saved)
    record = json.loads(saved)
    assert record["document"] == str(doc) and record["prompt_tokens"] > 0
    # the table output too
    table = invoke(["prefill", str(doc), "--model", str(tiny_model_dir)])
    assert_clean_outcome(table, {0})
    _assert_private(table.stdout, table.stderr)


def test_prefill_errors_do_not_echo_the_document(secret_env, tiny_model_dir, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text((DOC_MARKER + " ") * 400, encoding="utf-8")  # far past the tiny model's context
    result = invoke(["prefill", str(doc), "--model", str(tiny_model_dir), "--json"])
    assert_clean_outcome(result, {2})
    _assert_private(result.stdout, result.stderr)


def test_profile_from_a_model_does_not_store_the_document(secret_env, tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.py"
    doc.write_text(TEXT * 4, encoding="utf-8")
    report = tmp_path / "profile.json"
    result = invoke(["profile", "--from-model", str(tiny_model_dir), "--doc", str(doc), "--seq-len", "64",
                     "--device", "cpu", "--backends", "pbs", "--budget", "0", "--iters", "1", "--warmup", "0",
                     "--block-size", "16", "--segment-size", "32", "-o", str(report), "--json"])
    assert_clean_outcome(result, {0})
    _assert_private(result.stdout, result.stderr, report.read_text(encoding="utf-8"))


def test_include_text_puts_the_document_in_the_report_on_request(secret_env, tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.py"
    doc.write_text(TEXT, encoding="utf-8")
    result = invoke(["prefill", str(doc), "--model", str(tiny_model_dir), "--json", "--include-text"])
    assert_clean_outcome(result, {0})
    record = json.loads(result.stdout)
    assert record["text"] == TEXT
    _assert_private(result.stdout, result.stderr, doc=False)
