"""The decode plan (quant/decode_tiles.py): whole when the VAE's estimate fits the free memory, else the
largest tiles and frame chunks that do, else the smallest."""

from __future__ import annotations

from quant.decode_tiles import CHUNK_FRAMES, TILE_PIXELS, USABLE_SHARE, plan_decode

GIB = 2 ** 30


def ltx_need(width: int, height: int, frames: int) -> int:
    """ComfyUI v0.33's estimate for the LTX video VAE (1700 bytes per latent cell and output pixel block of
    8x8x8, bf16), at 32x spatial and 8x temporal compression."""
    return 1700 * ((frames - 1) // 8 + 1) * (height // 32) * (width // 32) * 8 * 8 * 8 * 2


def test_whole_when_it_fits():
    plan = plan_decode(1536, 1024, 121, 80 * GIB, ltx_need)
    assert plan.tile is None and plan.fits and plan.whole_bytes == ltx_need(1536, 1024, 121)


def test_largest_fitting_tile_and_chunk_are_chosen():
    free = 12 * GIB
    plan = plan_decode(1536, 1024, 121, free, ltx_need)
    assert plan.whole_bytes > free * USABLE_SHARE and plan.tile is not None and plan.fits
    assert plan.need_bytes <= free * USABLE_SHARE
    chosen = min(plan.tile, 1536) * min(plan.tile, 1024) * (plan.frames or 121)
    for tile in TILE_PIXELS:  # no candidate of more pixels-frames fits
        for frames in (121, *CHUNK_FRAMES):
            w, h = min(tile, 1536), min(tile, 1024)
            if w * h * frames > chosen and (w, h, frames) != (1536, 1024, 121):
                assert ltx_need(w, h, frames) > free * USABLE_SHARE, (tile, frames)
    assert plan.overlap == 64 and (plan.frames is None or plan.temporal_overlap == 8)


def test_smallest_tile_when_nothing_fits():
    plan = plan_decode(1536, 1024, 121, 1, ltx_need)
    assert (plan.tile, plan.frames, plan.fits) == (TILE_PIXELS[-1], CHUNK_FRAMES[-1], False)
    assert "exceeds the free memory" in plan.describe(1)


def test_a_short_clip_is_never_cut_into_chunks_as_long_as_itself():
    plan = plan_decode(1536, 1024, 17, 1, ltx_need)
    assert plan.frames is None or plan.frames < 17
