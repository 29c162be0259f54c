"""The text encoder's weight bytes per policy at Gemma 3 12B's real shapes (quant/text_encoder.py), against
the issue's targets, and its plan: which weights each policy quantizes."""

from __future__ import annotations

import math

import pytest

from quant import text_encoder as te
from quant import weights
from quant.policies import POLICIES, get_policy

GIB = 2 ** 30


def test_gemma3_12b_shapes_are_the_release_sizes():
    shapes = {**te.language_shapes(te.GEMMA3_12B), **te.vision_shapes(te.GEMMA3_12B.hidden_size),
              **te.projection_shapes(te.GEMMA3_12B)}
    params = sum(math.prod(s) for s in shapes.values())
    # Gemma 3 12B: 12.19e9 parameters with its vision tower (ComfyUI's Gemma3_12B built on meta: 12,187,325,040),
    # plus the LTX-2.3 projection 188,160 x (4,096 + 2,048) and its biases.
    assert params == 12_187_325_040 + 188_160 * 6_144 + 6_144
    assert shapes["text_embedding_projection.video_aggregate_embed.weight"] == (4096, 3840 * 49)


@pytest.mark.parametrize("policy", ["fp8-cast", "fp8-scaled-mm", "int8-scaled-mm", "int8-convrot"])
def test_8bit_text_encoder_within_13_gib(policy):
    assert te.weight_bytes(get_policy(policy)) <= 13 * GIB


def test_nvfp4_text_encoder_within_8_gib():
    assert te.weight_bytes(get_policy("nvfp4")) <= 8 * GIB


def test_bytes_add_up_from_storage_nbytes():
    """bf16 is 2 bytes a parameter; fp8's total is bf16's minus what each quantized matrix saves."""
    bf16 = te.weight_bytes(get_policy("bf16"))
    linears = [s for k, s in te.language_shapes(te.GEMMA3_12B).items() if te.LINEAR_RE.match(k[: -len(".weight")])]
    projections = [s for k, s in te.projection_shapes(te.GEMMA3_12B).items() if k.endswith(".weight")]
    embedding = (te.GEMMA3_12B.vocab_size, te.GEMMA3_12B.hidden_size)
    saved = sum(2 * r * c - weights.storage_nbytes(weights.FP8_ROWWISE, (r, c))
                for r, c in [*linears, *projections, embedding])
    assert len(linears) == 7 * 48 and len(projections) == 2
    assert te.weight_bytes(get_policy("fp8-scaled-mm")) == bf16 - saved
    assert 23 * GIB < bf16 < 25 * GIB  # ~24.9 GB in bf16, what does not fit 24 GB cards


def test_plan_quantizes_linears_projection_and_embedding_only():
    table = [(k[: -len(".weight")], s, "BF16", 2) for k, s in te.language_shapes(te.GEMMA3_12B).items()]
    table += [("text_embedding_projection.video_aggregate_embed", (4096, 188160), "BF16", 2),
              ("vision_model.encoder.layers.0.mlp.fc1", (4304, 1152), "BF16", 2)]
    for name in POLICIES:
        decisions = {d.layer: d for d in te.plan_text_encoder(get_policy(name), table)}
        if name == "bf16":
            assert not any(d.changed for d in decisions.values())
            continue
        assert decisions["model.layers.7.mlp.down_proj"].target_format == weights.fitting_format(
            POLICIES[name].weight_format, (3840, 15360))
        assert decisions["model.embed_tokens"].target_format == weights.FP8_ROWWISE
        assert decisions["model.embed_tokens"].weight_only
        assert decisions["text_embedding_projection.video_aggregate_embed"].weight_only
        assert not decisions["vision_model.encoder.layers.0.mlp.fc1"].changed
        assert not decisions["model.norm"].changed
        assert decisions["model.layers.0.self_attn.q_proj"].weight_only == (name == "fp8-cast")


def test_layout_read_back_from_shapes_and_wrong_files_refused():
    shapes = te.language_shapes(te.GEMMA3_12B)
    assert te.layout_from_shapes("g.safetensors", shapes) == te.GEMMA3_12B
    with pytest.raises(ValueError, match="x.safetensors: not a Gemma 3 text encoder"):
        te.layout_from_shapes("x.safetensors", {"model.diffusion_model.foo.weight": (2, 2)})
    odd = dict(shapes)
    odd["model.layers.0.self_attn.q_norm.weight"] = (128,)
    with pytest.raises(ValueError, match="heads of 128 features"):
        te.layout_from_shapes("h.safetensors", odd)


def test_quantized_file_layers_are_requantized_only_into_smaller_formats():
    shape = (3840, 15360)
    fp8 = ("model.layers.0.mlp.down_proj", shape, weights.FP8_TENSOR, weights.storage_nbytes(weights.FP8_TENSOR, shape))
    fp4 = ("model.layers.1.mlp.down_proj", shape, weights.NVFP4, weights.storage_nbytes(weights.NVFP4, shape))
    for name in ("fp8-cast", "fp8-scaled-mm", "int8-convrot", "mxfp8"):
        decisions = te.plan_text_encoder(get_policy(name), [fp8, fp4])
        assert [d.changed for d in decisions] == [False, False], name  # same size or bigger: kept
    kept_fp8, kept_fp4 = te.plan_text_encoder(get_policy("nvfp4"), [fp8, fp4])
    assert kept_fp8.target_format == weights.NVFP4 and kept_fp8.bytes_after < kept_fp8.bytes_before
    assert not kept_fp4.changed


def test_out_of_memory_advice_names_the_smaller_text_encoders_that_fit():
    from quant.advice import text_encoder_out_of_memory_advice
    sizes = {name: te.weight_bytes(policy) for name, policy in POLICIES.items()}
    text = text_encoder_out_of_memory_advice("bf16", sizes, 16 * GIB)
    assert "policy bf16 (24.9 GiB of weights) on this 16.0 GiB GPU" in text
    assert "fp8-scaled-mm (12.8 GiB)" in text and "nvfp4 (8.0 GiB)" in text and "device to cpu" in text
    small = text_encoder_out_of_memory_advice("fp8-scaled-mm", sizes, 10 * GIB)
    assert "nvfp4 (8.0 GiB)" in small and "mxfp8" not in small and "bf16" not in small
