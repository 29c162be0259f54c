"""How to decode a video latent within the free memory: whole, or in spatial tiles and temporal chunks.

The VAE's own estimate of the memory a decode of a latent shape needs (ComfyUI's `memory_used_decode`)
is asked for the whole video, then for tiles from large to small; the first that fits is used. Larger
tiles mean fewer seams to blend and fewer passes, so the search goes from the whole clip down to the
smallest tile ComfyUI's templates use (256 px, 16 frames), which is taken when nothing fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Tile edges in pixels and chunk lengths in frames, largest first (ComfyUI's VAE Decode (Tiled) widgets:
# 768 px and whole clips in the LTX templates, 512/64 in LTX-2.5's).
TILE_PIXELS = (1024, 768, 512, 384, 256)
CHUNK_FRAMES = (64, 32, 16)
SPATIAL_OVERLAP = 64  # px, the templates' overlap
TEMPORAL_OVERLAP = 8  # frames, core's default
# The share of the free memory a decode may plan on: the estimate is ComfyUI's, not a measurement.
USABLE_SHARE = 0.9


@dataclass(frozen=True)
class DecodePlan:
    """`tile` None: decode whole. Otherwise core's VAE Decode (Tiled) arguments."""

    tile: int | None
    overlap: int = 0
    frames: int | None = None  # None: all frames in one chunk
    temporal_overlap: int = 0
    need_bytes: int = 0  # the estimate for what is decoded at once
    whole_bytes: int = 0  # the estimate for the whole video
    fits: bool = True  # False: even the smallest tile exceeds the free memory (taken anyway)

    def describe(self, free_bytes: int) -> str:
        gib = 2 ** 30
        if self.tile is None:
            return f"decoded whole: needs ~{self.whole_bytes / gib:.1f} GiB, {free_bytes / gib:.1f} GiB free"
        chunk = "all frames" if self.frames is None else f"{self.frames}-frame chunks"
        return (f"decoded in {self.tile} px tiles, {chunk}: ~{self.need_bytes / gib:.1f} GiB at once (whole: "
                f"~{self.whole_bytes / gib:.1f} GiB, {free_bytes / gib:.1f} GiB free)"
                + ("" if self.fits else "; even this exceeds the free memory"))


def plan_decode(width: int, height: int, frames: int, free_bytes: int,
                need: Callable[[int, int, int], int]) -> DecodePlan:
    """The largest decode of a `width` x `height` x `frames` video whose `need(w, h, frames)` (bytes, the
    VAE's estimate for a piece of that size in pixels) fits `free_bytes`."""
    budget = free_bytes * USABLE_SHARE
    whole = need(width, height, frames)
    if whole <= budget:
        return DecodePlan(None, need_bytes=whole, whole_bytes=whole)
    candidates = []
    for tile in TILE_PIXELS:
        for chunk in (None, *CHUNK_FRAMES):
            if (tile >= max(width, height) and chunk is None) or (chunk is not None and chunk >= frames):
                continue  # the whole clip, or a chunk no shorter than it: asked above or by the chunkless one
            w, h, f = min(tile, width), min(tile, height), frames if chunk is None else chunk
            candidates.append((w * h * f, tile, chunk, need(w, h, f)))
    candidates.sort(key=lambda c: -c[0])
    for _, tile, chunk, bytes_needed in candidates:
        if bytes_needed <= budget:
            return _plan(tile, chunk, bytes_needed, whole, True)
    _, tile, chunk, bytes_needed = candidates[-1]
    return _plan(tile, chunk, bytes_needed, whole, False)


def _plan(tile: int, chunk: int | None, need_bytes: int, whole_bytes: int, fits: bool) -> DecodePlan:
    return DecodePlan(tile, SPATIAL_OVERLAP, chunk, 0 if chunk is None else TEMPORAL_OVERLAP, need_bytes, whole_bytes,
                      fits)
