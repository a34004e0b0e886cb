"""The GPU tiles of the plan launchers (``pbs_kernels.triton.tiles``): frozen values, and a bad value is
refused when made, with a message that names the field and a value to use instead."""

from __future__ import annotations

import dataclasses

import pytest

from pbs_kernels.triton.tiles import (PERMUTE_TILES, SAMPLED_TILES, SELECT_TILES, PermuteTiles, SampledTiles,
                                      SelectTiles)


@pytest.mark.parametrize("cls, field, value, fix", [
    (PermuteTiles, "block_m", 48, "try 32"),
    (PermuteTiles, "block_n", 8, "try 16"),
    (PermuteTiles, "num_warps", 64, "try 32"),
    (PermuteTiles, "num_warps", 0, "try 1"),
    (PermuteTiles, "span", 0, "try 4096"),
    (SelectTiles, "tile_elements", 3000, "try 2048"),
    (SelectTiles, "top_p_warps", 3, "try 2"),
    (SelectTiles, "score_block", 8, "try 16"),
    (SampledTiles, "rows", 0, "try 64"),
    (SampledTiles, "num_warps", 6, "try 4"),
    (SampledTiles, "num_stages", -1, "try 3"),
    (SampledTiles, "heads", 0, "try 4"),
    (SampledTiles, "key_blocks", 3, "try 2"),
    (SampledTiles, "top_p_warps", 3, "try 2"),
    (SampledTiles, "top_p_rows", 0, "try 1"),
])
def test_a_bad_value_is_refused_with_a_fix(cls, field, value, fix):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {value}; {fix}$"):
        cls(**{field: value})
    fixed = int(fix.removeprefix("try "))
    assert getattr(cls(**{field: fixed}), field) == fixed  # the suggested value is accepted


@pytest.mark.parametrize("cls, field", [(PermuteTiles, "block_n"), (SelectTiles, "score_block"),
                                        (SampledTiles, "num_warps")])
@pytest.mark.parametrize("value", ["64", 64.0, True])
def test_only_ints_are_tiles(cls, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        cls(**{field: value})


@pytest.mark.parametrize("cls, field", [(SelectTiles, "top_p_warps"), (SelectTiles, "score_block"),
                                        (SampledTiles, "num_stages"), (SampledTiles, "top_p_warps"),
                                        (SampledTiles, "top_p_rows")])
def test_none_leaves_the_choice_to_the_launcher(cls, field):
    assert getattr(cls(**{field: None}), field) is None


@pytest.mark.parametrize("tiles", [PERMUTE_TILES, SELECT_TILES, SAMPLED_TILES])
def test_the_defaults_are_frozen_and_valid(tiles):
    field = dataclasses.fields(tiles)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(tiles, field, 1)
    assert dataclasses.replace(tiles) == tiles  # revalidates every field


def test_sampled_launch_options_leave_out_unset_stages():
    assert SampledTiles(num_warps=8, num_stages=None).launch_options() == {"num_warps": 8}
    assert SampledTiles(num_warps=2, num_stages=3).launch_options() == {"num_warps": 2, "num_stages": 3}


def test_sampled_tiles_fit_fp32_inputs():
    """fp32 inputs take at most 64 rows, 4 warps and 2 stages (twice the bytes per key tile); 16-bit inputs keep
    the tiles as given."""
    big = SampledTiles(rows=128, num_warps=8, num_stages=4)
    assert big.fitting(2) is big
    small = big.fitting(4)
    assert (small.rows, small.num_warps, small.num_stages) == (64, 4, 2)
    assert (small.key_blocks, small.copy_keys, small.tma) == (big.key_blocks, big.copy_keys, big.tma)
    assert SampledTiles(rows=16, num_warps=1, num_stages=None).fitting(4).num_stages == 2
