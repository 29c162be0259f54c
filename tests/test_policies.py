"""Policies: names, default scope (the 28 block Linears), scope overrides, plans and the decision table.

The expected layer sets are spelled out here from the issue text, not taken from quant.ltx2's
regexes, so a wrong regex cannot make its own test pass.
"""

from __future__ import annotations

import re

import pytest
import torch

from quant import ltx2, weights
from quant.policies import POLICIES, LayerDecision, Policy, format_table, get_policy, plan, summarize

ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
FEEDFORWARDS = ("ff", "audio_ff")
FF_PROJECTIONS = ("net.0.proj", "net.2")
# Audio-side linears (issue): audio_attn1/2, audio_ff, audio_to_video_attn.to_k/to_v,
# video_to_audio_attn.to_q/to_out.0.
AUDIO_SIDE = (
    [f"audio_attn1.{p}" for p in PROJECTIONS] + [f"audio_attn2.{p}" for p in PROJECTIONS]
    + [f"audio_ff.{p}" for p in FF_PROJECTIONS]
    + ["audio_to_video_attn.to_k", "audio_to_video_attn.to_v", "video_to_audio_attn.to_q", "video_to_audio_attn.to_out.0"]
)
QUANTIZING = ("fp8-cast", "fp8-scaled-mm", "mxfp8", "nvfp4")
# Layers outside the blocks that a real checkpoint has and the synthetic model does not.
EXTRA_OUTER_LAYERS = [
    ("video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q", (64, 64)),
    ("video_embeddings_connector.transformer_1d_blocks.0.ff.net.0.proj", (256, 64)),
    ("audio_embeddings_connector.transformer_1d_blocks.3.attn1.to_out.0", (32, 32)),
    ("prompt_adaln_single.linear", (128, 64)),
    ("av_ca_video_scale_shift_adaln_single.linear", (256, 64)),
    ("caption_projection.linear_1", (64, 128)),
    # Not `.weight` keys in a file (so never layers there), but 2-D: a plan must still keep them.
    ("scale_shift_table", (2, 64)),
    ("transformer_blocks.0.scale_shift_table", (9, 64)),
    ("transformer_blocks.3.audio_prompt_scale_shift_table", (2, 32)),
]


def block_linears(block: int) -> list[str]:
    names = [f"transformer_blocks.{block}.{a}.{p}" for a in ATTENTIONS for p in PROJECTIONS]
    names += [f"transformer_blocks.{block}.{f}.{p}" for f in FEEDFORWARDS for p in FF_PROJECTIONS]
    assert len(names) == 28
    return names


def layer_table(config: dict, dtype_name: str = "BF16", itemsize: int = 2, extra=()) -> list:
    rows = []
    for key, shape in ltx2.model_shapes(config).items():
        if key.endswith(".weight"):
            n = itemsize
            for d in shape:
                n *= d
            rows.append((key[: -len(".weight")], tuple(shape), dtype_name, n))
    for layer, shape in extra:
        if any(r[0] == layer for r in rows):
            continue
        rows.append((layer, shape, dtype_name, shape[0] * shape[1] * itemsize))
    return rows


def quantized(decisions: list[LayerDecision]) -> set[str]:
    return {d.layer for d in decisions if d.changed}


@pytest.fixture(scope="module")
def config4():
    return ltx2.tiny_config(num_layers=4)


@pytest.fixture(scope="module")
def table4(config4):
    return layer_table(config4, extra=EXTRA_OUTER_LAYERS)


# ---------------------------------------------------------------------------------------------
# Policy names and get_policy
# ---------------------------------------------------------------------------------------------

def test_policy_names():
    assert set(POLICIES) == {"fp8-cast", "fp8-scaled-mm", "int8-scaled-mm", "int8-convrot", "mxfp8", "nvfp4", "bf16"}
    for name, policy in POLICIES.items():
        assert policy.name == name
        assert get_policy(name) is policy or get_policy(name) == policy


def test_policy_formats_and_activations():
    assert get_policy("bf16").weight_format is None
    assert get_policy("fp8-cast").weight_format in (weights.FP8_ROWWISE, weights.FP8_TENSOR)
    assert get_policy("fp8-cast").activation == "none"  # weight-only: dequantize, bf16 matmul
    assert get_policy("fp8-scaled-mm").weight_format in (weights.FP8_ROWWISE, weights.FP8_TENSOR)
    assert get_policy("fp8-scaled-mm").activation == "fp8"  # W8A8
    assert get_policy("mxfp8").weight_format == weights.MXFP8
    assert get_policy("nvfp4").weight_format == weights.NVFP4


@pytest.mark.parametrize("bad", ["fp4", "NVFP4", "", "fp8"])
def test_unknown_policy_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError) as exc:
        get_policy(bad)
    assert repr(bad) in str(exc.value)
    for name in POLICIES:  # and says what is available
        assert name in str(exc.value)


def test_fp8_per_channel_by_default_and_per_tensor_on_request():
    for name in ("fp8-cast", "fp8-scaled-mm"):
        assert get_policy(name).weight_format == weights.FP8_ROWWISE
        per_tensor = get_policy(name, fp8_per_tensor=True)
        assert per_tensor.weight_format == weights.FP8_TENSOR
        assert per_tensor.activation == get_policy(name).activation
        assert per_tensor.name == name
    for name in ("mxfp8", "bf16"):
        assert get_policy(name, fp8_per_tensor=True) == get_policy(name)
    assert get_policy("nvfp4", fp8_per_tensor=True).weight_format == weights.NVFP4
    # NVFP4's FP8 outer layers follow the request too.
    assert get_policy("nvfp4").outer_format == weights.FP8_ROWWISE
    assert get_policy("nvfp4", fp8_per_tensor=True).outer_format == weights.FP8_TENSOR
    # The registry itself is not mutated.
    assert POLICIES["fp8-cast"].weight_format == weights.FP8_ROWWISE


def test_get_policy_scope_changes_accept_lists():
    p = get_policy("nvfp4", include=["a*"], exclude=["b*", "c*"], keep_first_blocks=1, keep_audio=True)
    assert p.scope.include == ("a*",) and p.scope.exclude == ("b*", "c*")
    assert p.scope.keep_first_blocks == 1 and p.scope.keep_audio
    assert POLICIES["nvfp4"].scope.exclude == ()  # frozen registry entry unchanged
    assert get_policy("nvfp4").scope == POLICIES["nvfp4"].scope


def test_scope_changes_add_to_the_policys_own_patterns():
    default = POLICIES["fp8-scaled-mm"].scope.exclude
    assert default == ("*.audio_to_video_attn.to_k", "*.audio_to_video_attn.to_v", "*.audio_to_video_attn.to_out.0")
    assert get_policy("fp8-scaled-mm", exclude=["*.ff.*"]).scope.exclude == (*default, "*.ff.*")
    assert get_policy("fp8-scaled-mm", policy_scope=False, exclude=["*.ff.*"]).scope.exclude == ("*.ff.*",)
    assert get_policy("fp8-scaled-mm", fp8_per_tensor=True).scope.exclude == default
    assert get_policy("fp8-scaled-mm", keep_audio=True).scope.keep_audio  # other fields are replaced


# ---------------------------------------------------------------------------------------------
# Default scope
# ---------------------------------------------------------------------------------------------

AUDIO_TO_VIDEO_4 = {f"transformer_blocks.{b}.audio_to_video_attn.{p}" for b in range(4)
                    for p in ("to_q", "to_k", "to_v", "to_out.0")}


@pytest.mark.parametrize("name", QUANTIZING)
def test_default_scope_is_the_28_block_linears_less_the_policys_own(name, config4, table4):
    """Every block Linear, except that fp8-scaled-mm keeps its audio->video attention's to_k, to_v and
    to_out.0 in bf16; with
    policy_scope=False every policy takes all 28 per block."""
    policy = get_policy(name)
    decisions = plan(policy, table4, 4)
    every = {n for b in range(4) for n in block_linears(b)}
    assert len(every) == 28 * 4
    kept = {n for n in AUDIO_TO_VIDEO_4 if not n.endswith(".to_q")}
    assert quantized(decisions) == (every - kept if name == "fp8-scaled-mm" else every)
    assert quantized(plan(get_policy(name, policy_scope=False), table4, 4)) == every
    for d in decisions:
        if d.changed:
            assert d.target_format == policy.weight_format and d.source_format == "BF16"
        else:
            assert d.target_format == "BF16" and d.bytes_after == d.bytes_before


@pytest.mark.parametrize("name", QUANTIZING)
def test_default_scope_keeps_high_precision_layers(name, table4):
    decisions = {d.layer: d for d in plan(get_policy(name), table4, 4)}
    kept_patterns = [r"adaln_single", r"scale_shift_table", r"q_norm", r"k_norm", r"to_gate_logits",
                     r"patchify_proj", r"proj_out", r"connector", r"caption_projection"]
    seen = {p: 0 for p in kept_patterns}
    for layer, d in decisions.items():
        for p in kept_patterns:
            if re.search(p, layer):
                seen[p] += 1
                assert not d.changed, f"{layer} must stay high precision under {name}"
    assert all(seen.values()), f"the table lacks some layer kinds: {seen}"


def test_bf16_policy_changes_nothing(table4):
    decisions = plan(get_policy("bf16"), table4, 4)
    assert not quantized(decisions)
    s = summarize(decisions)
    assert s["bytes_before"] == s["bytes_after"] and s["ratio"] == 1.0


def test_full_size_ltx23_config_quantizes_28_x_48():
    config = dict(ltx2.LTX23_CONFIG)
    decisions = plan(get_policy("nvfp4"), layer_table(config), config["num_layers"])
    assert len(quantized(decisions)) == 28 * 48
    shapes = {d.layer: d.shape for d in decisions}
    assert shapes["transformer_blocks.7.ff.net.0.proj"] == (16384, 4096)
    assert shapes["transformer_blocks.7.audio_to_video_attn.to_q"] == (2048, 4096)
    assert shapes["transformer_blocks.7.video_to_audio_attn.to_k"] == (2048, 4096)
    # 4.5 bits per weight for NVFP4 (4-bit data + one e4m3 scale per 16 + padding), vs 16 for bf16.
    qd = [d for d in decisions if d.changed]
    ratio = sum(d.bytes_before for d in qd) / sum(d.bytes_after for d in qd)
    assert 3.5 < ratio < 16 / 4.5 + 1e-9


# ---------------------------------------------------------------------------------------------
# Scope overrides
# ---------------------------------------------------------------------------------------------

def test_exclude_pattern(table4):
    decisions = plan(get_policy("nvfp4", exclude=["*.attn2.*"]), table4, 4)
    got = quantized(decisions)
    assert len(got) == 24 * 4
    assert not any(".attn2." in n for n in got)
    decisions = plan(get_policy("nvfp4", exclude=["transformer_blocks.1.*", "*.ff.net.2"]), table4, 4)
    got = quantized(decisions)
    assert not any(n.startswith("transformer_blocks.1.") for n in got)
    assert len(got) == 3 * 27  # block 1 gone; ff.net.2 gone from the others (audio_ff.net.2 stays)
    assert "transformer_blocks.0.audio_ff.net.2" in got


def test_include_pattern_adds_outer_layers(table4):
    decisions = plan(get_policy("mxfp8", include=["transformer_blocks.*.to_gate_logits", "patchify_proj"]), table4, 4)
    got = quantized(decisions)
    gate = {n for n in got if n.endswith("to_gate_logits")}
    assert len(gate) == 6 * 4  # every gated attention of every block, not the connectors'
    assert not any("connector" in n for n in got)
    assert "patchify_proj" in got and "audio_patchify_proj" not in got
    assert len(got) == 28 * 4 + 6 * 4 + 1


def test_exclude_wins_over_include(table4):
    policy = get_policy("nvfp4", include=["*to_gate_logits", "patchify_proj", "*connector*"],
                        exclude=["*to_gate_logits", "*.to_q"])
    got = quantized(plan(policy, table4, 4))
    assert not any(n.endswith("to_gate_logits") or n.endswith(".to_q") for n in got)
    assert "patchify_proj" in got
    connectors = {n for n in got if "connector" in n}
    assert connectors and not any(n.endswith("to_q") for n in connectors)
    assert len(got) == (28 - 6) * 4 + 1 + len(connectors)


def test_include_never_quantizes_non_2d_tensors(table4):
    got = quantized(plan(get_policy("nvfp4", include=["*"]), table4, 4))
    shapes = {row[0]: row[1] for row in table4}
    assert got and all(len(shapes[n]) == 2 for n in got)
    assert not any(n.endswith("norm") for n in got)


@pytest.mark.parametrize("first,last", [(1, 0), (0, 1), (1, 1), (2, 1), (4, 0), (0, 5)])
def test_keep_first_and_last_blocks(first, last, table4):
    got = quantized(plan(get_policy("fp8-cast", keep_first_blocks=first, keep_last_blocks=last), table4, 4))
    kept = set(range(first)) | set(range(4 - last, 4))
    expected = {n for b in range(4) if b not in kept for n in block_linears(b)}
    assert got == expected


def test_keep_audio(table4):
    got = quantized(plan(get_policy("nvfp4", keep_audio=True), table4, 4))
    expected = {n for b in range(4) for n in block_linears(b)
                if n.split(".", 2)[2] not in AUDIO_SIDE}
    assert got == expected
    assert len(got) == 14 * 4
    # The video-side cross-modal linears stay quantized.
    assert "transformer_blocks.2.audio_to_video_attn.to_q" in got
    assert "transformer_blocks.2.audio_to_video_attn.to_out.0" in got
    assert "transformer_blocks.2.video_to_audio_attn.to_k" in got
    assert "transformer_blocks.2.video_to_audio_attn.to_v" in got
    assert "transformer_blocks.2.audio_to_video_attn.to_k" not in got
    assert "transformer_blocks.2.video_to_audio_attn.to_out.0" not in got


def test_is_audio_side_matches_the_issue_list():
    for b in (0, 13):
        for n in block_linears(b):
            assert ltx2.is_audio_side(n) == (n.split(".", 2)[2] in AUDIO_SIDE), n


def test_scope_options_combine(table4):
    got = quantized(plan(get_policy("nvfp4", keep_audio=True, keep_first_blocks=1, exclude=["*.ff.*"]), table4, 4))
    assert len(got) == 3 * 12
    assert not any(n.startswith("transformer_blocks.0.") for n in got)


# ---------------------------------------------------------------------------------------------
# Plans over already-quantized sources, bytes
# ---------------------------------------------------------------------------------------------

def test_plan_keeps_or_requantizes_quantized_sources():
    shape = (64, 64)
    nv = weights.storage_nbytes(weights.NVFP4, shape)
    fp8 = weights.storage_nbytes(weights.FP8_TENSOR, shape)
    rows = [("transformer_blocks.0.attn1.to_q", shape, weights.NVFP4, nv),
            ("transformer_blocks.0.attn1.to_k", shape, weights.FP8_TENSOR, fp8),
            ("transformer_blocks.0.attn1.to_gate_logits", (2, 64), weights.FP8_TENSOR, 2 * 64 + 4)]
    d = {x.layer: x for x in plan(get_policy("nvfp4"), rows, 1)}
    assert not d["transformer_blocks.0.attn1.to_q"].changed and d["transformer_blocks.0.attn1.to_q"].bytes_after == nv
    assert d["transformer_blocks.0.attn1.to_k"].target_format == weights.NVFP4
    assert d["transformer_blocks.0.attn1.to_k"].bytes_after == nv
    # Out of scope: an already-quantized layer is left as it is.
    assert d["transformer_blocks.0.attn1.to_gate_logits"].target_format == weights.FP8_TENSOR
    d = {x.layer: x for x in plan(get_policy("bf16"), rows, 1)}
    assert [x.target_format for x in d.values()] == [weights.NVFP4, weights.FP8_TENSOR, weights.FP8_TENSOR]


@pytest.mark.parametrize("name", QUANTIZING)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_bytes_after_matches_storage_nbytes_and_real_weights(name, per_tensor, config4):
    policy = get_policy(name, fp8_per_tensor=per_tensor)
    table = layer_table(config4)
    decisions = plan(policy, table, 4)
    state = ltx2.synthetic_state_dict(config4)
    seen_shapes = set()
    for d in decisions:
        assert d.bytes_before == state[d.layer + ".weight"].numel() * 2
        if not d.changed:
            continue
        assert d.bytes_after == weights.storage_nbytes(policy.weight_format, d.shape)
        if d.shape in seen_shapes:
            continue
        seen_shapes.add(d.shape)
        qw = weights.quantize_weight(state[d.layer + ".weight"], policy.weight_format)
        assert qw.nbytes == d.bytes_after, (d.layer, d.shape)
        specs = weights.storage_specs(policy.weight_format, d.shape)
        assert set(specs) == set(qw.tensors)
        for suffix, (dtype, shape) in specs.items():
            assert qw.tensors[suffix].dtype == dtype and tuple(qw.tensors[suffix].shape) == tuple(shape)
    assert len(seen_shapes) >= 4
    s = summarize(decisions)
    assert s["bytes_after"] < s["bytes_before"] and s["ratio"] > 1


@pytest.mark.parametrize("fmt", weights.FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (130, 40), (300, 208), (64, 4096)])
def test_storage_nbytes_equals_quantized_nbytes_odd_shapes(fmt, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
    if weights.rotation(fmt) and shape[1] % weights.rotation(fmt):
        with pytest.raises(weights.FormatError, match="ConvRot"):  # plan() gives such layers plain INT8
            weights.quantize_weight(w, fmt)
        return
    assert weights.quantize_weight(w, fmt).nbytes == weights.storage_nbytes(fmt, shape)


def test_nvfp4_is_the_smallest_and_fp8_half_of_bf16(table4):
    sizes = {n: summarize(plan(get_policy(n), table4, 4))["bytes_after"] for n in POLICIES}
    assert sizes["nvfp4"] == min(sizes.values())
    assert sizes["bf16"] == max(sizes.values())
    assert sizes["nvfp4"] < sizes["mxfp8"] and sizes["nvfp4"] < sizes["fp8-cast"]
    every_fp8_scaled_mm = summarize(plan(get_policy("fp8-scaled-mm", policy_scope=False), table4, 4))["bytes_after"]
    assert sizes["fp8-cast"] == every_fp8_scaled_mm < sizes["fp8-scaled-mm"]  # its bf16 a2v attention
    assert sizes["fp8-cast"] > summarize(plan(get_policy("fp8-cast", fp8_per_tensor=True), table4, 4))["bytes_after"]


# ---------------------------------------------------------------------------------------------
# The decision table
# ---------------------------------------------------------------------------------------------

def _parse_table(text: str):
    lines = text.splitlines()
    header, body, total = lines[0], lines[1:-1], lines[-1]
    rows = [re.split(r"\s{2,}", line.strip()) for line in body]
    return header, rows, total


def test_format_table_content(config4):
    table = layer_table(ltx2.tiny_config(num_layers=2))
    decisions = plan(get_policy("nvfp4"), table, 2)
    text = format_table(decisions)
    header, rows, total = _parse_table(text)
    for word in ("layer", "shape", "format", "bytes before", "bytes after"):
        assert word in header
    assert len(rows) == len(decisions)
    by_layer = {r[0]: r for r in rows}
    assert set(by_layer) == {d.layer for d in decisions}
    for d in decisions:
        layer, shape, fmt, before, after = by_layer[d.layer]
        assert shape == "x".join(map(str, d.shape))
        assert int(before.replace(",", "")) == d.bytes_before
        assert int(after.replace(",", "")) == d.bytes_after
        if d.changed:
            assert fmt == f"BF16 -> {weights.NVFP4}"
            assert d.bytes_after == weights.storage_nbytes(weights.NVFP4, d.shape)
        else:
            assert fmt == "BF16"
    q = by_layer["transformer_blocks.1.ff.net.0.proj"]
    assert q[1] == "256x64" and q[2] == "BF16 -> nvfp4" and q[3] == "32,768"
    assert q[4] == f"{weights.storage_nbytes('nvfp4', (256, 64)):,}"
    s = summarize(decisions)
    assert f"{s['bytes_before']:,}" in total and f"{s['bytes_after']:,}" in total
    assert f"{s['ratio']:.2f}x" in total
    assert "'nvfp4': 56" in total


def test_format_table_only_changed():
    table = layer_table(ltx2.tiny_config(num_layers=2))
    decisions = plan(get_policy("fp8-scaled-mm", policy_scope=False, keep_first_blocks=1), table, 2)
    text = format_table(decisions, only_changed=True)
    _header, rows, total = _parse_table(text)
    assert len(rows) == 28
    assert all(r[0].startswith("transformer_blocks.1.") for r in rows)
    assert all(r[2] == "BF16 -> float8_e4m3fn_rowwise" for r in rows)
    # The totals still cover every layer, not only the listed ones.
    s = summarize(decisions)
    assert f"{s['bytes_before']:,}" in total


def test_layer_decision_changed_property():
    d = LayerDecision("x", (4, 4), "BF16", "BF16", 32, 32)
    assert not d.changed
    assert LayerDecision("x", (4, 4), "BF16", "nvfp4", 32, 12).changed


def test_policy_dataclass_is_frozen():
    p = get_policy("nvfp4")
    with pytest.raises(Exception):
        p.weight_format = "mxfp8"  # type: ignore[misc]
    assert isinstance(p, Policy)


@pytest.mark.parametrize("fmt", weights.FORMATS)
@pytest.mark.parametrize("shape", [(600, 2048), (300, 4096), (70, 16384)])
def test_row_chunked_quantize_weight_matches_one_pass(fmt, shape):
    """quantize_weight works in row chunks to bound memory; the bytes must equal a one-pass quantization
    (global NVFP4 / per-tensor FP8 scales span all chunks; padding only at the end)."""
    from quant import formats
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.05).to(torch.bfloat16)
    w[shape[0] - 1, 3] = 0.9  # the amax sits in the last chunk
    qw = weights.quantize_weight(w, fmt)
    if fmt == weights.NVFP4:
        ref = dict(zip(("weight", "weight_scale", "weight_scale_2"), formats.quantize_nvfp4(w, search_scales=True)))
    elif fmt == weights.MXFP8:
        ref = dict(zip(("weight", "weight_scale"), formats.quantize_mxfp8(w)))
    elif fmt in weights.INT8_FORMATS:
        group = weights.rotation(fmt)
        ref = dict(zip(("weight", "weight_scale"),
                       formats.quantize_int8_rows(formats.rotate_groups(w, group) if group else w)))
    else:
        scale = formats.fp8_scale(w, per_channel=fmt == weights.FP8_ROWWISE)
        ref = {"weight": formats.quantize_fp8(w, scale), "weight_scale": scale}
    assert set(qw.tensors) == set(ref)
    for k, t in ref.items():
        got = qw.tensors[k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("name", ["fp8-scaled-mm", "mxfp8", "nvfp4"])
def test_few_token_layers_run_weight_only(name, table4):
    """Audio-token and text-context inputs are too few rows for 8-bit activations to pay: those
    layers are weight-only (ComfyUI's full_precision_matrix_mult), the video-token ones are not."""
    from quant.comfy_quant import layer_conf
    decisions = {d.layer: d for d in plan(get_policy(name, policy_scope=False), table4, 4) if d.changed}
    weight_only = {layer for layer, d in decisions.items() if d.weight_only}
    expected = {layer for layer in decisions if ltx2.is_audio_side(layer)
                or re.search(r"\.attn2\.to_[kv]$", layer)}
    assert weight_only == expected
    assert "transformer_blocks.0.attn2.to_k" in weight_only and "transformer_blocks.0.audio_attn1.to_q" in weight_only
    for layer in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_q",
                  "transformer_blocks.0.ff.net.2", "transformer_blocks.0.video_to_audio_attn.to_k",
                  "transformer_blocks.0.audio_to_video_attn.to_q"):
        assert layer in decisions and layer not in weight_only
    for layer, d in decisions.items():
        assert layer_conf(d).get("full_precision_matrix_mult", False) == (layer in weight_only)


def test_fp8_cast_is_weight_only_everywhere(table4):
    decisions = [d for d in plan(get_policy("fp8-cast"), table4, 4) if d.changed]
    assert decisions and all(d.weight_only for d in decisions)
    assert not any(d.weight_only for d in plan(get_policy("bf16"), table4, 4))


@pytest.mark.parametrize("name", QUANTIZING)
def test_connectors_scope_adds_the_text_connectors_in_8_bits_weight_only(name, table4):
    """`connectors` quantizes the text connectors' Linears: 8-bit (NVFP4 policies use FP8 there),
    always weight-only; their gate logits and everything else outside the blocks stay."""
    policy = get_policy(name, connectors=True)
    decisions = {d.layer: d for d in plan(policy, table4, 4)}
    outer = {layer for layer, d in decisions.items() if d.changed and not ltx2.BLOCK_LINEAR_RE.match(layer)}
    assert outer == {layer for layer in decisions if ltx2.CONNECTOR_LINEAR_RE.match(layer)}
    for layer in ("video_embeddings_connector.transformer_1d_blocks.0.ff.net.2",
                  "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q",
                  "audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_out.0"):
        assert layer in outer, layer
        assert decisions[layer].target_format == policy.outer_format and decisions[layer].weight_only
    for layer in ("patchify_proj", "proj_out", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_2",
                  "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_gate_logits"):
        assert not decisions[layer].changed, layer
    expected_format = weights.FP8_ROWWISE if name == "nvfp4" else get_policy(name).weight_format
    assert policy.outer_format == expected_format
    block = {layer for layer, d in decisions.items() if d.changed} - outer
    assert block == quantized(plan(get_policy(name), table4, 4))  # the blocks are decided as without it


def test_weight_only_patterns(table4):
    """Scope.weight_only patterns take quantized layers off 8-bit activations; unquantized layers
    stay unflagged, and the few-token rule still applies."""
    policy = get_policy("fp8-scaled-mm", policy_scope=False, weight_only=["*.audio_to_video_attn.*"], exclude=["*.ff.*"])
    decisions = {d.layer: d for d in plan(policy, table4, 4)}
    assert decisions["transformer_blocks.1.audio_to_video_attn.to_q"].weight_only
    assert decisions["transformer_blocks.1.audio_to_video_attn.to_out.0"].weight_only
    assert not decisions["transformer_blocks.1.attn1.to_q"].weight_only
    assert decisions["transformer_blocks.1.audio_attn1.to_q"].weight_only
    assert not decisions["transformer_blocks.1.ff.net.2"].changed and not decisions["transformer_blocks.1.ff.net.2"].weight_only


def test_audio_8bit_and_8bit_patterns_make_a_mixed_nvfp4_model(table4):
    """nvfp4 with `audio_8bit` / `eight_bit`: the chosen block Linears in FP8, the rest NVFP4, the same
    layers quantized as without them; 8-bit policies are unchanged by either."""
    policy = get_policy("nvfp4", audio_8bit=True, eight_bit=["*.attn1.to_q"])
    decisions = {d.layer: d for d in plan(policy, table4, 4)}
    fp8 = {layer for layer, d in decisions.items() if d.target_format == weights.FP8_ROWWISE}
    expected = {n for b in range(4) for n in block_linears(b)
                if n.split(".", 2)[2] in AUDIO_SIDE or n.endswith(".attn1.to_q")}
    assert fp8 == expected
    assert {layer for layer, d in decisions.items() if d.target_format == weights.NVFP4} == \
        {n for b in range(4) for n in block_linears(b)} - expected
    # Audio-side layers read few tokens: weight-only; the video-token FP8 layers run W8A8.
    assert {layer for layer in fp8 if decisions[layer].weight_only} == {n for n in fp8 if not n.endswith(".attn1.to_q")}
    assert get_policy("nvfp4", audio_8bit=True, fp8_per_tensor=True).outer_format == weights.FP8_TENSOR
    for name in ("fp8-scaled-mm", "mxfp8"):
        assert plan(get_policy(name, audio_8bit=True, eight_bit=["*"]), table4, 4) == plan(get_policy(name), table4, 4)


def test_8bit_flags_reach_the_scope():
    from quant.cli import _scope, build_parser
    args = build_parser().parse_args(["quantize", "in.safetensors", "out.safetensors", "--policy", "nvfp4",
                                      "--audio-8bit", "--8bit", "*.attn1.*"])
    assert _scope(args)["audio_8bit"] is True and _scope(args)["eight_bit"] == ["*.attn1.*"]


def test_fp8_layers_outside_the_8bit_scope_of_an_nvfp4_policy_stay_weight_only(table4):
    """Only the block Linears an NVFP4 scope picks for FP8 run W8A8; its other FP8 layers (included
    outer layers such as proj_out, the connectors) stay weight-only, as before mixed models existed."""
    decisions = {d.layer: d for d in plan(get_policy("nvfp4", include=["proj_out"], eight_bit=["*.attn1.to_q"]),
                                          table4, 4)}
    assert decisions["proj_out"].target_format == weights.FP8_ROWWISE and decisions["proj_out"].weight_only
    assert not decisions["transformer_blocks.1.attn1.to_q"].weight_only
    # A policy that keeps a file's FP8 layers does not decide their activations (the file's flag does).
    kept = plan(get_policy("bf16"), [(n, s, weights.FP8_TENSOR, b) for n, s, _, b in table4], 4)
    assert [d.layer for d in kept if d.weight_only] == [d.layer for d in kept if ltx2.reads_few_tokens(d.layer)]
