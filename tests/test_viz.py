"""`pbs viz-mask`: renderer on small known masks, analysis numbers against token-level oracles,
PNG/SVG/HTML writers, the CLI on the synthetic default and on a tiny model, error cases."""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import pytest
import torch
from rich.console import Console

from fixtures import assert_clean_outcome, invoke, offline_env, tiny_model_dir  # noqa: F401
from pbs_cli.engine import mask_analysis as ma
from pbs_cli.render import viz
from pbs_cli.engine.mask_views import parse_indices
from pbs_kernels import PBSConfig, build_plan
from pbs_kernels import reference as ref

NO_COLOR = {"NO_COLOR": "1", "COLUMNS": "100"}


def _render(renderable, width: int, color: bool) -> str:
    con = Console(width=width, file=io.StringIO(), force_terminal=color, color_system="truecolor" if color else None,
                  record=True, soft_wrap=True)
    con.print(renderable)
    return con.export_text(styles=False)


# -- renderer on known masks ----------------------------------------------------------------------


def test_plain_mask_exact_characters():
    kept = np.tri(4, dtype=bool)
    kept[2, 0] = False  # one skipped causal block
    forced = np.eye(4, dtype=bool)
    frac, share, causal = viz.downsample_mask(kept, forced, 1)
    lines = [t.plain for t in viz.cells_to_lines(viz.mask_cells(frac, share, causal), color=False)]
    assert lines == ["█   ", "██  ", "░██ ", "████"]


def test_colour_mask_uses_half_blocks_two_rows_per_line():
    kept = np.array([[1, 0], [1, 1]], dtype=bool)
    forced = np.array([[1, 0], [0, 1]], dtype=bool)
    frac, share, causal = viz.downsample_mask(kept, forced, 1)
    lines = viz.cells_to_lines(viz.mask_cells(frac, share, causal), color=True)
    assert [t.plain for t in lines] == ["▀▄"]
    styles = [str(span.style) for span in lines[0].spans]
    forced_full = viz._blend(viz.SKIPPED_TERM, viz.KEPT_FORCED, 1.0)
    selected_full = viz._blend(viz.SKIPPED_TERM, viz.KEPT_SELECTED, 1.0)
    # (0,0) forced on top of (1,0) selected; (0,1) is above the diagonal so only the lower half is drawn
    assert styles == [f"{forced_full} on {selected_full}", forced_full]


def test_heatmap_plain_ramp_follows_log_mass():
    mass = np.array([[1.0, 0, 0, 0], [0.1, 1, 0, 0], [0.01, 0.1, 1, 0], [1e-4, 0.01, 0.1, 1]])
    values = viz.log_scale(np.where(viz.causal_mask(4), mass, np.nan), vmax=1.0)
    lines = [t.plain for t in viz.cells_to_lines(viz.heatmap_cells(values), color=False)]
    # 1 -> top of the scale, 0.1 -> 2/3, 0.01 -> 1/3, 1e-4 -> below 3 decades (bottom), upper triangle blank
    assert lines == ["█   ", "▓█  ", "▒▓█ ", "░▒▓█"]


def test_downsample_averages_causal_blocks_only():
    mass = np.arange(1, 17, dtype=float).reshape(4, 4) * np.tri(4)
    tiles, causal = viz.downsample_mass(mass, 2)
    assert causal.tolist() == [[True, False], [True, True]]
    assert tiles[0, 0] == pytest.approx((1 + 5 + 6) / 3)  # 3 causal blocks in the diagonal tile
    assert tiles[1, 0] == pytest.approx((9 + 10 + 13 + 14) / 4)
    assert tiles[1, 1] == pytest.approx((11 + 15 + 16) / 3)
    assert np.isnan(tiles[0, 1])
    assert viz.downsample_factor(64, 31) == 3 and viz.downsample_factor(31, 31) == 1


def test_colour_scale_endpoints():
    assert viz.colour(0.0) == "#440154" and viz.colour(1.0) == "#fde725"
    assert viz.colour(-3) == viz.colour(0) and viz.colour(7) == viz.colour(1)


# -- analysis numbers against independent references ---------------------------------------------


@pytest.fixture(scope="module")
def small_case():
    from pbs_cli.engine.workloads import synthetic_qkv

    q, k, _ = synthetic_qkv(1, 4, 2, 600, 32, seed=3)  # N not a multiple of the block size
    config = PBSConfig(block_size=32, segment_size=64, threshold=0.8)
    return q, k, config, ma.analyze(q, k, config, [0, 1, 3])


def test_recall_matches_reference_attention_recall(small_case):
    q, k, config, views = small_case
    plan = build_plan(q, k, config)
    expected = ref.attention_recall(q, k, plan, torch.arange(q.shape[2])).mean(-1)[0]
    for v in views:
        assert v.stats.recall == pytest.approx(float(expected[v.stats.head]), abs=1e-5)
        assert v.stats.density == pytest.approx(float(plan.density_per_head()[0, v.stats.head]), abs=1e-9)
        assert (v.kept == plan.to_dense()[0, v.stats.head].numpy()).all()


@pytest.mark.parametrize("config", [
    PBSConfig(block_size=32, segment_size=64, threshold=0.8),
    PBSConfig(block_size=32, segment_size=64, per_head_permutation=True, score="sampled", sample_rows=4),
    PBSConfig(block_size=32, segment_size=64, permute_heads="auto", threshold_scope="total", row_top=1,
              score="sampled", sample_rows=4),
], ids=["gqa", "per-head", "auto"])
def test_plan_heads_equals_the_whole_layer_plan_rows(small_case, config):
    q, k, _, _ = small_case  # 4 query heads, 2 KV heads
    whole = build_plan(q, k, config)
    heads = [3, 0, 2]
    part = ma.plan_heads(q, k, config, heads, None)
    g = q.shape[1] // whole.perm.shape[1]
    idx = torch.tensor(heads)
    assert torch.equal(part.perm[0], whole.perm[0, idx // g])
    assert torch.equal(part.to_dense()[0], whole.to_dense()[0, idx])
    assert torch.equal(part.density_per_head()[0], whole.density_per_head()[0, idx])


def test_block_mass_matches_token_level_oracle(small_case):
    q, k, config, views = small_case
    plan = build_plan(q, k, config)
    n, bs = q.shape[2], config.block_size
    n_b = math.ceil(n / bs)
    diag = ref.segment_starts(n_b, bs, config.segment_size)
    for v in views:
        h = v.stats.head
        s = (q[0, h].double() @ k[0, h // 2].double().T) / math.sqrt(q.shape[-1])
        p = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        perm = plan.perm[0, h // 2].long()
        for i in range(n_b):
            rows = p[i * bs : min(n, (i + 1) * bs)]
            for j in range(i + 1):
                keys_orig = torch.arange(j * bs, min(n, (j + 1) * bs))
                keys_plan = perm[keys_orig] if j < diag[i] else keys_orig
                assert v.original[i, j] == pytest.approx(rows[:, keys_orig].sum(1).mean().item(), abs=1e-5)
                assert v.permuted[i, j] == pytest.approx(rows[:, keys_plan].sum(1).mean().item(), abs=1e-5)
        assert np.allclose(v.original.sum(1), 1, atol=1e-5) and np.allclose(v.permuted.sum(1), 1, atol=1e-5)


def test_block_mass_chunking_does_not_change_results(small_case, monkeypatch):
    q, k, config, _ = small_case
    perm = build_plan(q, k, config).perm[0].repeat_interleave(2, 0)  # (H_q, N)
    kx = k[0].repeat_interleave(2, 0)
    whole = ma.block_attention_mass(q[0], kx, perm, 32, 64)
    monkeypatch.setattr(ma, "_CHUNK_ELEMENTS", 600 * 32 * 2)  # two heads per pass, 2 query blocks per chunk
    split = ma.block_attention_mass(q[0], kx, perm, 32, 64)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6)


def test_forced_blocks_are_kept_and_forced_only_rows_counted(small_case):
    q, k, config, views = small_case
    for v in views:
        assert (v.kept | ~v.forced).all(), "every forced block must be kept"
        n_b = v.kept.shape[0]
        start = ref.segment_starts(n_b, config.block_size, config.segment_size).numpy()
        cols = np.arange(n_b)
        selectable = (cols[None, :] < start[:, None]) & ~v.forced
        expected = sum(1 for i in range(n_b) if selectable[i].any() and not (v.kept[i] & selectable[i]).any())
        assert v.stats.forced_only_rows == expected
        assert v.stats.rows_with_choice == int(selectable.any(1).sum())
        # the sink (original token 0) lies in block 0 of the plan layout for rows past the first segment
        assert all(v.forced[i, 0] for i in range(n_b) if start[i] > 0)


def test_forced_only_rows_found_at_tiny_threshold():
    from pbs_cli.engine.workloads import synthetic_qkv

    q, k, _ = synthetic_qkv(1, 1, 1, 512, 32, seed=1, pattern="sink")
    (view,) = ma.analyze(q, k, PBSConfig(block_size=32, segment_size=64, threshold=0.05), [0])
    # a sink head at tau=0.05: the forced sink block alone covers the share, so rows keep nothing else
    assert view.stats.forced_only_rows > 0
    assert view.stats.forced_only_rows <= view.stats.rows_with_choice == 14


def test_equal_density_comparison_reproduces_a_plain_plan():
    from pbs_cli.engine.workloads import synthetic_qkv

    q, k, _ = synthetic_qkv(1, 1, 1, 640, 32, seed=5, pattern="topic")
    config = PBSConfig(block_size=32, segment_size=64, threshold=0.7)
    plain = build_plan(q, k, config.replace(permute=False))
    mass, _ = ma.block_attention_mass(q[0], k[0], plain.perm[0], 32, 64)
    target = plain.density()
    expected = float(ma.recall_of(mass, plain.to_dense()[0], 640, 32)[0])
    density, recall = ma._noperm_at_density(q, k, config, target, mass[0], None)
    # the plain plan of the same density is one of the candidates: its recall, not an interpolation
    assert density == pytest.approx(target, abs=1e-9)
    assert recall == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("config", [
    PBSConfig(block_size=32, segment_size=64),
    PBSConfig(block_size=32, segment_size=64, threshold_scope="total", local_blocks=1, sink=False),
    PBSConfig(block_size=32, segment_size=128, score="sampled", sample_rows=8, threshold_scope="total", row_top=2),
    PBSConfig(block_size=32, segment_size=64, score="sampled", sample_rows=4),
    PBSConfig(block_size=32, segment_size=64, score="mean_query", threshold_scope="total"),
    PBSConfig(block_size=32, segment_size=64, forced_in_top_p=False, local_blocks=1),
], ids=["pooled", "pooled-total-local", "sampled-rowtop", "sampled-offdiag", "mean-query", "forced-after-top-p"])
def test_rethresholding_one_ranking_reproduces_every_plain_plan(config):
    """One scoring pass + re-thresholding gives exactly the plans of reference.select_blocks, and the
    curve lists each of them with its density and recall."""
    from pbs_cli.engine.workloads import synthetic_qkv

    q, k, _ = synthetic_qkv(1, 1, 1, 700, 32, seed=7)  # partial last block
    n, bs = 700, config.block_size
    forced, before = ma.plain_selection_order(q, k, config)
    perm = ref.identity_permutation(1, 1, n, q.device)
    mass, _ = ma.block_attention_mass(q[0], k[0], perm[0], bs, config.segment_size)
    curve_d, curve_r = ma.plain_selection_curve(forced, before, mass[0], n, bs)
    assert (curve_d[1:] > curve_d[:-1]).all() and curve_d[-1] == pytest.approx(1.0)
    for tau in (0.05, 0.3, 0.6, 0.85, 0.95, 0.99, 1.0):
        plan = build_plan(q, k, config.replace(permute=False, threshold=tau))
        expected = plan.to_dense()[0, 0]
        kept = forced | (before < tau - 1e-6) | ((tau >= 1.0) & torch.isfinite(before))
        assert torch.equal(kept, expected), f"tau={tau}: {int((kept != expected).sum())} blocks differ"
        d = plan.density()
        r = float(ma.recall_of(mass, expected[None], n, bs)[0])
        i = int(torch.argmin((curve_d - d).abs()))
        assert curve_d[i] == pytest.approx(d, abs=1e-9) and curve_r[i] == pytest.approx(r, abs=1e-5)


def test_no_permutation_means_no_verdict():
    from pbs_cli.engine.workloads import synthetic_qkv

    q, k, _ = synthetic_qkv(1, 2, 1, 300, 32, seed=0)
    views = ma.analyze(q, k, PBSConfig(block_size=32, segment_size=64, permute=False), [0, 1])
    assert [v.stats.verdict for v in views] == ["n/a", "n/a"]
    assert views[0].stats.recall_gain is None


def test_verdict_band():
    assert ma.verdict(0.02) == "helped" and ma.verdict(-0.02) == "hurt" and ma.verdict(0.001) == "neutral"


def test_bad_head_index_names_the_range(small_case):
    q, k, config, _ = small_case
    with pytest.raises(ValueError, match=r"head 4 out of range.*4 query heads \(0-3\)"):
        ma.analyze(q, k, config, [4])


# -- whole pictures -------------------------------------------------------------------------------


@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("width", [60, 100])
def test_head_picture_fits_the_width(small_case, color, width):
    *_, views = small_case
    text = _render(viz.render_head(views[0], width, color), width, color)
    from rich.cells import cell_len

    assert max(cell_len(line) for line in text.splitlines()) <= width
    assert "density" in text and "recall" in text and "forced-only rows" in text


def test_head_picture_downsamples_and_says_so():
    n_b = 64
    rng = np.random.default_rng(0)
    mass = np.tri(n_b) * rng.random((n_b, n_b))
    mass /= mass.sum(1, keepdims=True)
    stats = ma.HeadStats(None, 0, 0.5, 0.9, 1, 60, 0.5, 0.88, 0.02, "helped")
    view = ma.HeadView(stats, mass, mass, np.tri(n_b, dtype=bool), np.eye(n_b, dtype=bool), n_b * 128, PBSConfig(), 1, 64)
    text = _render(viz.render_head(view, 100, False), 100, False)
    assert "1 cell = 2×2 blocks" in text  # 64 blocks into (100 - 4) // 3 = 32 columns
    text = _render(viz.render_head(view, 90, False), 90, False)
    assert "1 cell = 3×3 blocks" in text  # (90 - 4) // 3 = 28 columns
    assert "permutation helped: +2.0 pts" in text


def test_overview_grid_marks_verdicts():
    stats = [ma.HeadStats(layer, h, 0.2 + 0.1 * h, 0.95, 0, 10, 0.2, 0.9, g, ma.verdict(g))
             for layer in (0, 1) for h, g in enumerate((0.03, -0.03, 0.0))]
    text = _render(viz.render_overview(stats, 100, False), 100, False)
    assert " 20▲ 30▼ 40·" in text
    assert "helped 2 ▲, hurt 2 ▼, neutral 2" in text


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_png_and_svg_writers(small_case, tmp_path):
    *_, views = small_case
    png, svg = tmp_path / "m.png", tmp_path / "m.svg"
    viz.save_figure(viz.head_figure(views[0]), png, "png")
    viz.save_figure(viz.head_figure(views[0]), svg, "svg")
    w, h = _png_size(png.read_bytes())
    assert 1500 <= w <= 3500 and 500 <= h <= 1500 and w > 2 * h  # three panels side by side
    assert png.stat().st_size > 30_000
    assert "<svg" in svg.read_text()[:2000] and "density" in svg.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "m.svg"]  # no temporary files left


def test_overview_png(tmp_path):
    stats = [ma.HeadStats(layer, h, 0.3, 0.9, 0, 10, 0.3, 0.9, 0.0, "neutral") for layer in range(3) for h in range(4)]
    path = tmp_path / "grid.png"
    viz.save_figure(viz.overview_figure(stats, "grid"), path, "png")
    assert _png_size(path.read_bytes())[0] > 500


def test_parse_indices():
    assert parse_indices("all", 3, "head") == [0, 1, 2]
    assert parse_indices("0-2,5,1", 8, "head") == [0, 1, 2, 5]
    from pbs_cli.errors import UsageError

    with pytest.raises(UsageError, match=r"layer 30 out of range: there are 30 layers \(0-29\)"):
        parse_indices("28-30", 30, "layer")
    with pytest.raises(UsageError, match="invalid head selection"):
        parse_indices("x", 3, "head")


# -- the command ----------------------------------------------------------------------------------


def test_cli_synthetic_default_plain(offline_env):
    result = invoke(["viz-mask", "--seq-len", "1k"], env=NO_COLOR)
    assert_clean_outcome(result, {0})
    out = result.stdout
    assert "\x1b[" not in out, "NO_COLOR / not a TTY must give the plain fallback"
    assert "original" in out and "permuted" in out and "kept" in out and "█" in out and "░" in out
    assert "density" in out and "recall" in out
    from rich.cells import cell_len

    assert max(cell_len(line) for line in out.splitlines()) <= 100


def test_cli_json_matches_the_picture(offline_env):
    res_json = invoke(["viz-mask", "--seq-len", "1k", "--head", "1", "--json"], env=NO_COLOR)
    assert_clean_outcome(res_json, {0})
    record = json.loads(res_json.stdout)
    assert record["command"] == "viz-mask" and record["schema_version"] >= 1
    (head,) = record["heads"]
    assert head["head"] == 1 and 0 < head["density"] <= 1 and 0 < head["recall"] <= 1
    res_txt = invoke(["viz-mask", "--seq-len", "1k", "--head", "1"], env=NO_COLOR)
    assert f"density {100 * head['density']:.1f}%" in res_txt.stdout
    assert f"recall {100 * head['recall']:.1f}%" in res_txt.stdout


def test_cli_heads_all_shows_overview_and_writes_outputs(offline_env, tmp_path):
    png, html = tmp_path / "o.png", tmp_path / "o.html"
    result = invoke(["viz-mask", "--seq-len", "512", "--heads", "all", "--block-size", "32", "--segment-size", "64",
                     "--png", str(png), "--html", str(html)], env=NO_COLOR)
    assert_clean_outcome(result, {0})
    assert "h0" in result.stdout and "h3" in result.stdout and "4 heads" in result.stdout
    assert _png_size(png.read_bytes())[0] > 500
    page = html.read_text()
    assert "<html" in page and "color: #" in page  # Rich export keeps the colours


@pytest.mark.parametrize("args, message", [
    (["--head", "9"], "head 9 out of range: there are 4 heads (0-3)"),
    (["--heads", "2-7"], "head 7 out of range"),
    (["--layer", "1"], "synthetic example has no layers"),
    (["--threshold", "1.5"], "threshold must be in (0, 1]"),
    (["--segment-size", "100", "--block-size", "64"], "segment_size must be a positive multiple"),
    (["/nonexistent/doc.txt"], "does not exist"),
])
def test_cli_usage_errors(offline_env, args, message):
    result = invoke(["viz-mask", "--seq-len", "512", *args], env=NO_COLOR)
    assert_clean_outcome(result, {2})
    assert message in result.stderr


def test_cli_output_path_refused_before_work(offline_env, tmp_path):
    missing = tmp_path / "nodir" / "x.png"
    result = invoke(["viz-mask", "--png", str(missing)], env=NO_COLOR)
    assert_clean_outcome(result, {2})
    assert "does not exist" in result.stderr and not missing.parent.exists()
    existing = tmp_path / "x.svg"
    existing.write_text("keep me")
    result = invoke(["viz-mask", "--svg", str(existing)], env=NO_COLOR)
    assert_clean_outcome(result, {2})
    assert "--force" in result.stderr and existing.read_text() == "keep me"
    assert result.stdout == "", "nothing is drawn when an output path is refused"


def test_cli_on_a_document_with_a_tiny_model(offline_env, tiny_model_dir, tmp_path):  # noqa: F811
    import argparse
    import inspect

    doc = tmp_path / "doc.txt"
    doc.write_text(open(inspect.getsourcefile(argparse)).read()[:4000])
    png = tmp_path / "real.png"
    base = ["viz-mask", str(doc), "--model", str(tiny_model_dir), "--block-size", "16", "--segment-size", "32"]
    result = invoke([*base, "--layer", "1", "--head", "2", "--png", str(png), "--json"], env=NO_COLOR)
    assert_clean_outcome(result, {0})
    record = json.loads(result.stdout)
    (head,) = record["heads"]
    assert (head["layer"], head["head"]) == (1, 2) and record["shape"]["seq_len"] == 256
    assert _png_size(png.read_bytes())[0] > 500
    bad = invoke([*base, "--layer", "2"], env=NO_COLOR)
    assert_clean_outcome(bad, {2})
    assert "layer 2 out of range: there are 2 layers (0-1)" in bad.stderr
    grid = invoke([*base, "--layers", "all", "--heads", "all"], env=NO_COLOR)
    assert_clean_outcome(grid, {0})
    assert "8 heads" in grid.stdout


@pytest.mark.slow
def test_cli_real_model_numbers_match_reference(tmp_path):
    """The embedded SmolLM2: the printed JSON recall equals the kernels' own attention_recall on the
    same captured layer, and the PNG is written."""
    import argparse
    import inspect

    from pbs_cli.engine import models
    from pbs_cli.engine.workloads import captured_qkv

    doc = tmp_path / "argparse.txt"
    doc.write_text(open(inspect.getsourcefile(argparse)).read())
    png = tmp_path / "layer10.png"
    result = invoke(["viz-mask", str(doc), "--model", "llama", "--layer", "10", "--head", "2", "--seq-len", "1k",
                     "--png", str(png), "--json"], env={"HF_HUB_OFFLINE": "1", **NO_COLOR})
    assert_clean_outcome(result, {0})
    (head,) = json.loads(result.stdout)["heads"]
    assert _png_size(png.read_bytes())[0] > 1500

    source = models.ModelSource(models.resolve_model("llama"))
    tokens = source.tokenizer()(doc.read_text(), return_tensors="pt")["input_ids"][:, :1024]
    loaded = source.load(torch.float32, "cpu", attn_implementation="sdpa")
    q, k, _ = captured_qkv(loaded.model, tokens, [10])[10]
    from pbs_cli.engine import presets

    config, _ = presets.resolve_config(source.spec.profile)  # what the command used: the alias's profile
    assert json.loads(result.stdout)["pbs"] == config.to_dict()
    plan = build_plan(q.float(), k.float(), config)
    recall = ref.attention_recall(q.float(), k.float(), plan, torch.arange(1024)).mean(-1)[0, 2].item()
    assert head["recall"] == pytest.approx(recall, abs=1e-4)
    assert head["density"] == pytest.approx(plan.density_per_head()[0, 2].item(), abs=1e-6)
