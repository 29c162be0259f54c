"""Quantization scopes as the nodes offer them: the measured presets and the include/exclude patterns a
user adds, turned into the scope changes policies.get_policy takes."""

from __future__ import annotations

from .policies import KEEP_AUDIO_TO_VIDEO_ATTENTION

# Scope patterns per include/exclude widget, and characters per pattern: the VRAM estimate matches each
# against each of the model's ~4,000 layers for every policy; 64 take it to about 0.5 s on one core.
MAX_SCOPE_PATTERNS = 64
MAX_PATTERN_CHARS = 256
# The loader's scope presets: which Linears a policy quantizes, as get_policy scope changes; the blocks
# third-party presets keep in bf16 and the measured ones.
# Every preset but "all block linears" adds to the policy's own scope (policies.POLICIES: fp8-scaled-mm
# keeps three of the audio-to-video attention's four Linears in bf16).
SCOPE_PRESETS = {
    "policy default": {},
    "all block linears": {"policy_scope": False},
    "keep blocks 0, 1, 46, 47": {"keep_first_blocks": 2, "keep_last_blocks": 2},
    "keep first and last block": {"keep_first_blocks": 1, "keep_last_blocks": 1},
    "keep audio branch": {"keep_audio": True},
    # For the other 8-bit policies: the whole audio->video cross-attention in bf16 (fp8-scaled-mm's default
    # keeps three of its four Linears). fp8-scaled-mm on the H200, 48 blocks: 11-16% less video error for
    # 1.1 GiB (docs/QUALITY.md); mxfp8 and fp8-cast: not measured on the GPU.
    "keep audio-to-video attention": {"exclude": list(KEEP_AUDIO_TO_VIDEO_ATTENTION)},
    # The release's text connectors hold 4 GB in bf16 and run once per prompt (8-bit, weight-only).
    "policy default + text connectors": {"connectors": True},
    # nvfp4 only (8-bit policies are 8-bit already): the audio-side Linears in FP8. Measured on the
    # H200 (docs/QUALITY.md): error vs bf16 24% (video) and 40% (audio) below core's nvfp4, 13.2 GiB.
    "audio branch 8-bit (nvfp4)": {"audio_8bit": True},
    # ... and the audio<->video attention too (its video-token layers run W8A8): measured on the H200,
    # 31% (video) and 53% (audio) below core's nvfp4 at 13.8 GiB (core: 15.0), 1.41x core bf16's speed.
    "audio branch + audio-video attention 8-bit (nvfp4)": {
        "audio_8bit": True, "eight_bit": ["*.audio_to_video_attn.*", "*.video_to_audio_attn.*"]},
}
def scope_patterns(field: str, text: str) -> list[str]:
    """The fnmatch patterns of an include/exclude widget (one per line or comma), within the limits:
    every pattern is matched against every layer for each policy the VRAM estimate weighs."""
    patterns = [p.strip() for p in text.replace(",", "\n").splitlines() if p.strip()]
    if len(patterns) > MAX_SCOPE_PATTERNS:
        raise ValueError(f"{field}: {len(patterns):,} patterns, more than the {MAX_SCOPE_PATTERNS} a scope takes "
                         "(one pattern such as *.attn2.* covers many layers)")
    long = next((p for p in patterns if len(p) > MAX_PATTERN_CHARS), None)
    if long is not None:
        raise ValueError(f"{field}: a pattern of {len(long):,} characters, more than the {MAX_PATTERN_CHARS} any layer "
                         "name needs")
    return patterns


def scope_options(preset: str, include: str, exclude: str, keep_first: int, keep_last: int, keep_audio: bool) -> dict:
    scope = dict(SCOPE_PRESETS[preset])
    scope["include"] = [*scope.get("include", []), *scope_patterns("include", include)]
    scope["exclude"] = [*scope.get("exclude", []), *scope_patterns("exclude", exclude)]
    scope["keep_first_blocks"] = max(keep_first, scope.get("keep_first_blocks", 0))
    scope["keep_last_blocks"] = max(keep_last, scope.get("keep_last_blocks", 0))
    scope["keep_audio"] = keep_audio or scope.get("keep_audio", False)
    return scope
