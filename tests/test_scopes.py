"""The scope presets and pattern widgets (quant/scopes.py) as get_policy scope changes."""

import pytest

from quant.policies import KEEP_AUDIO_TO_VIDEO_ATTENTION, get_policy
from quant.scopes import (
    MAX_PATTERN_CHARS,
    MAX_SCOPE_PATTERNS,
    SCOPE_PRESETS,
    scope_options,
    scope_patterns,
)


def test_every_preset_is_a_valid_scope_for_every_policy():
    for preset in SCOPE_PRESETS:
        scope = scope_options(preset, "", "", 0, 0, False)
        for policy in ("fp8-scaled-mm", "nvfp4"):
            assert get_policy(policy, **scope).name == policy


def test_a_preset_and_the_widgets_add_up():
    scope = scope_options("keep audio-to-video attention", "*.ff.net.0.proj", "*.attn2.*, *.ff.*\n*.audio_ff.*", 3, 0,
                          False)
    assert scope["exclude"] == [*KEEP_AUDIO_TO_VIDEO_ATTENTION, "*.attn2.*", "*.ff.*", "*.audio_ff.*"]
    assert scope["include"] == ["*.ff.net.0.proj"]
    # The widgets never keep fewer blocks than the preset does.
    kept = scope_options("keep blocks 0, 1, 46, 47", "", "", 1, 5, True)
    assert (kept["keep_first_blocks"], kept["keep_last_blocks"], kept["keep_audio"]) == (2, 5, True)
    assert SCOPE_PRESETS["keep blocks 0, 1, 46, 47"] == {"keep_first_blocks": 2, "keep_last_blocks": 2}


def test_pattern_limits_name_the_widget():
    assert len(scope_patterns("exclude", ",".join(["a"] * MAX_SCOPE_PATTERNS))) == MAX_SCOPE_PATTERNS
    with pytest.raises(ValueError, match=f"exclude: {MAX_SCOPE_PATTERNS + 1} patterns, more than the "
                                         f"{MAX_SCOPE_PATTERNS}"):
        scope_patterns("exclude", ",".join(["a"] * (MAX_SCOPE_PATTERNS + 1)))
    with pytest.raises(ValueError, match=f"include: a pattern of {MAX_PATTERN_CHARS + 1} characters"):
        scope_patterns("include", "x" * (MAX_PATTERN_CHARS + 1))
