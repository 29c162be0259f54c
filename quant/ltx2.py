"""LTX-2 / LTX-2.3 / LTX-2.5 model facts: key names, layer scopes, family detection, and a small
synthetic state dict with the real key names (for the demo and the tests; no weights are downloaded)."""

from __future__ import annotations

import json
import re

import torch

from .safetensors_io import parse_json

CHECKPOINT_PREFIX = "model.diffusion_model."
# ComfyUI identifies the LTX family by this key and the audio-video model (LTXAV) by the second.
FAMILY_KEY = "adaln_single.emb.timestep_embedder.linear_1.bias"
AUDIO_VIDEO_KEY = "audio_adaln_single.linear.weight"
# Only LTX-2.3 and LTX-2.5 have gated attention; ComfyUI tells 2.3 from 2.0 by the header `config` alone.
LTX23_MARKER = re.compile(r"^transformer_blocks\.\d+\.attn1\.to_gate_logits\.weight$")
# LTX-2.5's FFN Linears have no bias (its header says ff_bias and audio_ff_bias false); ComfyUI reads
# that from the header too, so a file is told apart by whether block 0's FFN has one.
FFN_BIAS_KEY = "transformer_blocks.0.ff.net.0.proj.bias"
FFN_WEIGHT_KEY = "transformer_blocks.0.ff.net.0.proj.weight"
# A learned position embedding LTX-2.5 adds to generated keyframes; ComfyUI builds it when the key is
# there, whatever the header says.
KEYFRAMES_EMBEDDING_KEY = "keyframes_abs_pos_embedding"
FAMILY_NAMES = {"ltx2": "LTX-2", "ltx2.3": "LTX-2.3", "ltx2.5": "LTX-2.5", "ltxv": "LTX-Video"}

ATTENTION_MODULES = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
FEEDFORWARD_MODULES = ("ff", "audio_ff")
BLOCK_LINEAR_RE = re.compile(
    r"^transformer_blocks\.(?P<block>\d+)\."
    r"(?:(?P<attn>" + "|".join(ATTENTION_MODULES) + r")\.(?P<proj>to_q|to_k|to_v|to_out\.0)"
    r"|(?P<ff>ff|audio_ff)\.(?P<ffproj>net\.0\.proj|net\.2))$"
)
# Linears whose activations live in the audio stream (input or output of audio width).
_AUDIO_SIDE = re.compile(
    r"\.(audio_attn1|audio_attn2|audio_ff)\.|\.audio_to_video_attn\.(to_k|to_v)$|\.video_to_audio_attn\.(to_q|to_out\.0)$"
)

# LTX-2.3 (22B) transformer config as found in the release header (ltx2.md).
LTX23_CONFIG = {
    "num_layers": 48, "num_attention_heads": 32, "attention_head_dim": 128, "cross_attention_dim": 4096,
    "audio_num_attention_heads": 32, "audio_attention_head_dim": 64, "audio_cross_attention_dim": 2048,
    "caption_channels": 3840, "apply_gated_attention": True, "cross_attention_adaln": True,
    "caption_proj_before_connector": True, "rope_type": "split", "frequencies_precision": "float64",
    "connector_num_layers": 8, "connector_attention_head_dim": 128, "connector_num_attention_heads": 32,
    "audio_connector_attention_head_dim": 64, "audio_connector_num_attention_heads": 32,
    "connector_num_learnable_registers": 128, "connector_apply_gated_attention": True,
    "av_ca_timestep_scale_multiplier": 1000, "timestep_scale_multiplier": 1000,
    "positional_embedding_max_pos": [20, 2048, 2048], "audio_positional_embedding_max_pos": [20], "norm_eps": 1e-6,
    # Also in the release header (seen in public copies of it); ComfyUI's LTX-2.3 text path needs them.
    "caption_projection_first_linear": False, "caption_projection_second_linear": False,
    "use_middle_indices_grid": True, "connector_positional_embedding_max_pos": [4096],
}
# LTX-2.5 keeps that layout and adds these header keys (Lightricks' ltx-core model_configurator, ComfyUI
# v0.33's LTXAVModel): bias-free FFN Linears and the keyframe embedding. use_prompt_adaln_single false
# (no prompt AdaLN embedders: the cross-attention's keys and values no longer depend on the timestep) is
# a variant ComfyUI v0.33 builds but cannot sample (its cross-attention AdaLN reads their output), so the
# release keeps them. connector_ff_bias is Lightricks' switch for the text connectors' FFN biases;
# ComfyUI v0.33 does not read it and always builds them, so model_shapes does too.
LTX25_CONFIG = {**LTX23_CONFIG, "ff_bias": False, "audio_ff_bias": False, "use_prompt_adaln_single": True,
                "use_keyframes_abs_pos_embedding": True, "connector_ff_bias": True}


def is_audio_side(layer: str) -> bool:
    return _AUDIO_SIDE.search("." + layer) is not None


# The text connectors' Linears (1,024 text tokens, once per prompt; 2.0 B parameters of the
# release, 4 GB in bf16). The AdaLN timestep MLPs are not among them: in FP8 they raised the
# final-latent error by half (docs/QUALITY.md); gate logits are tiny.
CONNECTOR_LINEAR_RE = re.compile(
    r"^(?:audio|video)_embeddings_connector\.transformer_1d_blocks\.\d+\."
    r"(?:attn1\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))$"
)

# The modules that run only while the conditioning is encoded (ComfyUI's
# LTXAVModel.preprocess_text_embeds, from extra_conds: once per sampling run), never in a denoising
# step: every layer of the two text connectors, and the caption projections where they run before the
# connectors (LTX-2.3; otherwise the model projects the context inside every step). Not the
# connectors' learnable registers: a raw parameter of the connector module itself, 1 MB.
_TEXT_CONNECTOR_MODULE_RE = re.compile(r"^(?:audio|video)_embeddings_connector\.")
_CAPTION_PROJECTION_MODULE_RE = re.compile(r"^(?:audio_)?caption_projection\.")


def runs_once_per_prompt(module: str, caption_proj_before_connector: bool) -> bool:
    """Whether a submodule of the transformer (its name under the diffusion model, e.g.
    `video_embeddings_connector.transformer_1d_blocks.0.ff.net.2`) runs only when the text
    conditioning is encoded: the weights the loader keeps in host memory and streams to the GPU when
    `text_connectors_on_cpu` is on, and that quant.memory leaves out of the resident weights."""
    return (_TEXT_CONNECTOR_MODULE_RE.match(module) is not None
            or (caption_proj_before_connector and _CAPTION_PROJECTION_MODULE_RE.match(module) is not None))


def tensor_runs_once_per_prompt(key: str, config: dict) -> bool:
    """runs_once_per_prompt for a tensor key of a `config` transformer (the module is the key's prefix)."""
    module = key.rsplit(".", 1)[0] if "." in key else ""
    return runs_once_per_prompt(module, bool(config.get("caption_proj_before_connector", False)))


_TEXT_CONTEXT_SIDE = re.compile(r"\.(attn2|audio_attn2)\.(to_k|to_v)$")


def reads_few_tokens(layer: str) -> bool:
    """A Linear whose input is the audio tokens (~126 for 121 frames) or the text context (1,024
    tokens), not the video tokens (6k-100k): its GEMM is too small for 8-bit
    activations to buy time, so W8A8 policies run it weight-only, without the activation rounding
    error."""
    if CONNECTOR_LINEAR_RE.match(layer):
        return True
    return BLOCK_LINEAR_RE.match(layer) is not None and (
        is_audio_side(layer) or _TEXT_CONTEXT_SIDE.search("." + layer) is not None)


def strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def detect_prefix(keys) -> str:
    """`model.diffusion_model.` for single-file checkpoints, '' for bare diffusion-model files."""
    keys = list(keys)
    if any(k == CHECKPOINT_PREFIX + FAMILY_KEY for k in keys):
        return CHECKPOINT_PREFIX
    return ""


def detect_family(keys, prefix: str) -> str | None:
    """'ltx2.5' / 'ltx2.3' / 'ltx2' (audio-video), 'ltxv' (video-only LTX), or None for a non-LTX file."""
    keys = set(keys)
    if prefix + FAMILY_KEY not in keys:
        return None
    if prefix + AUDIO_VIDEO_KEY not in keys:
        return "ltxv"
    if any(LTX23_MARKER.match(strip_prefix(k, prefix)) for k in keys):
        bias_free = prefix + FFN_WEIGHT_KEY in keys and prefix + FFN_BIAS_KEY not in keys
        return "ltx2.5" if bias_free else "ltx2.3"
    return "ltx2"


def transformer_config(metadata: dict[str, str]) -> dict | None:
    """The header's transformer config, None when the header has none. A `config` that is there but
    unreadable, or whose `transformer` entry is not an object, is a ValueError saying what it is
    (ComfyUI would fail on it, or build the model without it)."""
    raw = metadata.get("config")
    if raw is None:
        return None
    try:
        config = parse_json(raw)
    except ValueError as e:
        raise ValueError(f"is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"is a JSON {type(config).__name__}, not an object")
    if "transformer" not in config:
        return None
    transformer = config["transformer"]
    if not isinstance(transformer, dict):
        raise ValueError(f"has 'transformer': {json.dumps(transformer)[:80]}; it must be a JSON object")
    return transformer


def block_count(keys, prefix: str) -> int:
    blocks = set()
    for k in keys:
        m = re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k)
        if m:
            blocks.add(int(m.group(1)))
    return max(blocks) + 1 if blocks else 0


# ---------------------------------------------------------------------------------------------
# A small synthetic LTX-2.3/2.5-shaped state dict
# ---------------------------------------------------------------------------------------------

def tiny_config(num_layers: int = 2, heads: int = 2, head_dim: int = 32, audio_heads: int = 2,
                audio_head_dim: int = 16, release: dict = LTX23_CONFIG) -> dict:
    """A `release` config (LTX23_CONFIG or LTX25_CONFIG) with its real structure and small widths
    (video width heads*head_dim).

    Connector widths equal the stream widths (ComfyUI requires it) and the caption projections
    are off, as in the releases (their text encoders emit stream-width embeddings)."""
    config = dict(release)
    config.update({
        "num_layers": num_layers, "num_attention_heads": heads, "attention_head_dim": head_dim,
        "cross_attention_dim": heads * head_dim, "audio_num_attention_heads": audio_heads,
        "audio_attention_head_dim": audio_head_dim, "audio_cross_attention_dim": audio_heads * audio_head_dim,
        "connector_num_layers": 1, "connector_num_attention_heads": heads, "connector_attention_head_dim": head_dim,
        "audio_connector_num_attention_heads": audio_heads, "audio_connector_attention_head_dim": audio_head_dim,
    })
    return config


def block_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of one transformer block (block 0 names), LTX-2.3/2.5 layout, as key -> shape."""
    v = config["num_attention_heads"] * config["attention_head_dim"]
    a = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    heads = config["num_attention_heads"]
    gated = config.get("apply_gated_attention", False)
    shapes: dict[str, tuple[int, ...]] = {}

    def attention(name: str, q_in: int, kv_in: int, inner: int, out: int, n_heads: int) -> None:
        for proj, (o, i) in (("to_q", (inner, q_in)), ("to_k", (inner, kv_in)), ("to_v", (inner, kv_in)),
                             ("to_out.0", (out, inner))):
            shapes[f"{name}.{proj}.weight"] = (o, i)
            shapes[f"{name}.{proj}.bias"] = (o,)
        shapes[f"{name}.q_norm.weight"] = (inner,)
        shapes[f"{name}.k_norm.weight"] = (inner,)
        if gated:
            shapes[f"{name}.to_gate_logits.weight"] = (n_heads, q_in)
            shapes[f"{name}.to_gate_logits.bias"] = (n_heads,)

    attention("attn1", v, v, v, v, heads)
    attention("attn2", v, v, v, v, heads)
    attention("audio_attn1", a, a, a, a, config["audio_num_attention_heads"])
    attention("audio_attn2", a, a, a, a, config["audio_num_attention_heads"])
    attention("audio_to_video_attn", v, a, a, v, config["audio_num_attention_heads"])
    attention("video_to_audio_attn", a, v, a, a, config["audio_num_attention_heads"])
    for name, width, bias in (("ff", v, config.get("ff_bias", True)),
                              ("audio_ff", a, config.get("audio_ff_bias", True))):
        shapes[f"{name}.net.0.proj.weight"] = (4 * width, width)
        shapes[f"{name}.net.2.weight"] = (width, 4 * width)
        if bias:
            shapes[f"{name}.net.0.proj.bias"] = (4 * width,)
            shapes[f"{name}.net.2.bias"] = (width,)
    rows = 9 if config.get("cross_attention_adaln") else 6
    shapes["scale_shift_table"] = (rows, v)
    shapes["audio_scale_shift_table"] = (rows, a)
    if config.get("cross_attention_adaln"):  # LTX-2.3 only, like its prompt AdaLN embedders
        shapes["prompt_scale_shift_table"] = (2, v)
        shapes["audio_prompt_scale_shift_table"] = (2, a)
    shapes["scale_shift_table_a2v_ca_video"] = (5, v)
    shapes["scale_shift_table_a2v_ca_audio"] = (5, a)
    return shapes


# AdaLN embedders outside the blocks: name -> (stream, rows per width) for LTX-2.3
# (cross_attention_adaln); LTX-2.0 has only the first and third, with 6 rows.
_ADALN_SINGLES = (("adaln_single", "v", 9), ("prompt_adaln_single", "v", 2), ("audio_adaln_single", "a", 9),
                  ("audio_prompt_adaln_single", "a", 2), ("av_ca_video_scale_shift_adaln_single", "v", 4),
                  ("av_ca_a2v_gate_adaln_single", "v", 1), ("av_ca_audio_scale_shift_adaln_single", "a", 4),
                  ("av_ca_v2a_gate_adaln_single", "a", 1))
_PROMPT_ADALN_SINGLES = ("prompt_adaln_single", "audio_prompt_adaln_single")


def model_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an LTX-2.3 or LTX-2.5 transformer (ComfyUI's LTXAVModel names and shapes) for
    `config`."""
    widths = {"v": config["num_attention_heads"] * config["attention_head_dim"],
              "a": config["audio_num_attention_heads"] * config["audio_attention_head_dim"]}
    v, a = widths["v"], widths["a"]
    shapes: dict[str, tuple[int, ...]] = {
        "scale_shift_table": (2, v), "audio_scale_shift_table": (2, a),
        "patchify_proj.weight": (v, 128), "patchify_proj.bias": (v,),
        "audio_patchify_proj.weight": (a, 128), "audio_patchify_proj.bias": (a,),
    }
    if config.get("use_keyframes_abs_pos_embedding"):
        shapes[KEYFRAMES_EMBEDDING_KEY] = (1, v)
    for name, stream, rows in _ADALN_SINGLES:
        if name in _PROMPT_ADALN_SINGLES and not config.get("use_prompt_adaln_single", True):
            continue
        width = widths[stream]
        shapes[f"{name}.emb.timestep_embedder.linear_1.weight"] = (width, 256)
        shapes[f"{name}.emb.timestep_embedder.linear_1.bias"] = (width,)
        shapes[f"{name}.emb.timestep_embedder.linear_2.weight"] = (width, width)
        shapes[f"{name}.emb.timestep_embedder.linear_2.bias"] = (width,)
        shapes[f"{name}.linear.weight"] = (rows * width, width)
        shapes[f"{name}.linear.bias"] = (rows * width,)
    for name, width, heads in (("audio_embeddings_connector", a, config["audio_connector_num_attention_heads"]),
                               ("video_embeddings_connector", v, config["connector_num_attention_heads"])):
        shapes[f"{name}.learnable_registers"] = (config.get("connector_num_learnable_registers", 128), width)
        for layer in range(config["connector_num_layers"]):
            prefix = f"{name}.transformer_1d_blocks.{layer}."
            shapes[prefix + "attn1.q_norm.weight"] = (width,)
            shapes[prefix + "attn1.k_norm.weight"] = (width,)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"{prefix}attn1.{proj}.weight"] = (width, width)
                shapes[f"{prefix}attn1.{proj}.bias"] = (width,)
            if config.get("connector_apply_gated_attention"):
                shapes[prefix + "attn1.to_gate_logits.weight"] = (heads, width)
                shapes[prefix + "attn1.to_gate_logits.bias"] = (heads,)
            shapes[prefix + "ff.net.0.proj.weight"] = (4 * width, width)
            shapes[prefix + "ff.net.0.proj.bias"] = (4 * width,)
            shapes[prefix + "ff.net.2.weight"] = (width, 4 * width)
            shapes[prefix + "ff.net.2.bias"] = (width,)
    for n in range(config["num_layers"]):
        for key, shape in block_shapes(config).items():
            shapes[f"transformer_blocks.{n}.{key}"] = shape
    shapes.update({"proj_out.weight": (128, v), "proj_out.bias": (128,),
                   "audio_proj_out.weight": (128, a), "audio_proj_out.bias": (128,)})
    return shapes


def synthetic_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights with Linear-like scale (std 1/sqrt(in)) under the real key names."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in model_shapes(config).items():
        std = shape[1] ** -0.5 if len(shape) == 2 else 0.02
        out[key] = (torch.randn(shape, generator=gen) * std).to(dtype)
    return out


def header_metadata(config: dict) -> dict[str, str]:
    return {"config": json.dumps({"transformer": config})}
