"""The LTX-2 text encoder: Gemma 3 12B and the LTX text projection, as ComfyUI's LTXAVTextEncoderLoader
loads them (a Gemma file from `text_encoders`, the projection from an LTX checkpoint), quantized while
they are read with the same formats and policies as the transformer.

What gets quantized: every Linear of Gemma's 48 decoder layers (attention q/k/v/o, MLP gate/up/down)
and the projection into the LTX-2.3 video and audio context, in the policy's weight format; the token
embedding table (262,208 x 3,840, 1.9 GiB in bf16) in FP8 with one scale per row, read row by row at
lookup. Norms, the vision tower (it only runs for image prompts) and biases stay as the file has them.
These are what brings an 8-bit encoder under 13 GiB and an NVFP4 one under 8 (test_text_encoder.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import weights
from .checkpoint import LayerSource, inspect_checkpoint
from .comfy_quant import conf_tensor, layer_conf
from .conversion import convert_layer, refuse_nonfinite
from .modes import Activation
from .policies import LayerDecision, Policy
from .safetensors_io import CheckpointError, SafetensorsFile, TensorInfo

LINEAR_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
PROJECTION_RE = re.compile(r"^text_embedding_projection(\.((video|audio)_)?aggregate_embed)?$")
EMBEDDING = "model.embed_tokens"
PROJECTION_PREFIX = "text_embedding_projection."
# LTX-2 (19B) checkpoints name the single projection `aggregate_embed`; ComfyUI builds it as the bare module.
LEGACY_PROJECTION_PREFIX = "text_embedding_projection.aggregate_embed."
TOKENIZER_KEY = "spiece_model"  # ComfyUI's Gemma files carry the SentencePiece model as a uint8 tensor
# ComfyUI's older "scaled fp8" files: a `scaled_fp8` marker and `scale_weight`/`scale_input` per layer.
SCALED_FP8_MARKER = "scaled_fp8"
LEGACY_SCALE_NAMES = {".scale_weight": ".weight_scale", ".scale_input": ".input_scale"}


@dataclass(frozen=True)
class GemmaLayout:
    """The sizes ComfyUI's Gemma3_12B_Config holds, as read back from a file's tensor shapes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def comfy_config(self) -> dict:
        """The config entries ComfyUI's Gemma3_12B_Config takes; its head_dim is fixed (a class attribute),
        so a file of another head size is refused when read (layout_from_shapes)."""
        return {k: v for k, v in vars(self).items() if k != "head_dim"}


GEMMA3_12B = GemmaLayout(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=256)
# LTX-2.3's projection of Gemma's 49 stacked hidden states: 4,096 video and 2,048 audio context features.
LTX23_PROJECTION = {"video_aggregate_embed": 4096, "audio_aggregate_embed": 2048}
# Gemma 3's SigLIP vision tower and its projector (ComfyUI's GEMMA3_VISION_CONFIG), kept as stored.
VISION = {"hidden": 1152, "intermediate": 4304, "layers": 27, "patches": (896 // 14) ** 2, "patch": 14}


def language_shapes(layout: GemmaLayout) -> dict[str, tuple[int, ...]]:
    """Every weight of Gemma's language model (what ComfyUI builds and reads), by tensor key."""
    h, head = layout.hidden_size, layout.head_dim
    q, kv = layout.num_attention_heads * head, layout.num_key_value_heads * head
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING + ".weight": (layout.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(layout.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "self_attn.q_norm.weight": (head,), p + "self_attn.k_norm.weight": (head,),
                       p + "mlp.gate_proj.weight": (layout.intermediate_size, h),
                       p + "mlp.up_proj.weight": (layout.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, layout.intermediate_size)})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
    return shapes


def vision_shapes(text_hidden: int) -> dict[str, tuple[int, ...]]:
    """The vision tower's and projector's tensors (ComfyUI's CLIPVision + Gemma3MultiModalProjector)."""
    h, m = VISION["hidden"], VISION["intermediate"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.patch_embedding.weight": (h, 3, VISION["patch"], VISION["patch"]),
        "vision_model.embeddings.patch_embedding.bias": (h,),
        "vision_model.embeddings.position_embedding.weight": (VISION["patches"], h),
        "vision_model.post_layernorm.weight": (h,), "vision_model.post_layernorm.bias": (h,),
        "multi_modal_projector.mm_input_projection.weight": (text_hidden, h),
        "multi_modal_projector.mm_soft_emb_norm.weight": (h,)}
    for i in range(VISION["layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{name}.weight"], shapes[f"{p}self_attn.{name}.bias"] = (h, h), (h,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (m, h), (m,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (h, m), (h,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"], shapes[f"{p}{norm}.bias"] = (h,), (h,)
    return shapes


def projection_shapes(layout: GemmaLayout, outputs: dict[str, int] = LTX23_PROJECTION) -> dict[str, tuple[int, ...]]:
    inputs = layout.hidden_size * (layout.num_hidden_layers + 1)  # every hidden state, the embeddings' too
    shapes: dict[str, tuple[int, ...]] = {}
    for name, width in outputs.items():
        shapes[f"{PROJECTION_PREFIX}{name}.weight"] = (width, inputs)
        shapes[f"{PROJECTION_PREFIX}{name}.bias"] = (width,)
    return shapes


def target_format(policy: Policy, layer: str, shape: tuple[int, ...]) -> str | None:
    """The format `policy` gives a text-encoder weight, or None to keep it as stored."""
    if policy.weight_format is None or len(shape) != 2:
        return None
    if layer == EMBEDDING:
        return weights.FP8_ROWWISE  # a row is read per token: one scale per row is exact to look up
    if LINEAR_RE.match(layer) or PROJECTION_RE.match(layer):
        return weights.fitting_format(policy.weight_format, shape)
    return None


def plan_text_encoder(policy: Policy, layers: list[tuple[str, tuple[int, ...], str, int]]) -> list[LayerDecision]:
    """Per-weight decisions (layer, logical shape, source format, bytes) as policies.plan gives them for
    the transformer; a layer the file holds quantized is kept as stored unless the policy's format is
    smaller. Weight-only (dequantize, then a 16-bit matmul): the embedding, the projection (it
    reads the prompt's few real tokens once) and every layer of a policy without 8-bit activations."""
    decisions = []
    for layer, shape, source, nbytes in layers:
        target = target_format(policy, layer, shape) or source
        after = nbytes if target == source else weights.storage_nbytes(target, shape)
        if source in weights.FORMATS and after >= nbytes:
            # A quantized file (gemma_3_12B_it_fp8_scaled, ..._fp4_mixed) is re-quantized only into a smaller
            # format, never rounded a second time for nothing.
            target, after = source, nbytes
        weight_only = target in weights.FORMATS and (
            layer == EMBEDDING or PROJECTION_RE.match(layer) is not None or policy.activation == Activation.NONE)
        decisions.append(LayerDecision(layer, tuple(shape), source, target, nbytes, after, weight_only))
    return decisions


def weight_bytes(policy: Policy, layout: GemmaLayout = GEMMA3_12B, outputs: dict[str, int] = LTX23_PROJECTION,
                 stored_itemsize: int = 2) -> int:
    """Bytes of every text-encoder weight (Gemma, its vision tower, the projection) under `policy`, from
    bf16 (`stored_itemsize` 2) weights of the layout's shapes."""
    shapes = {**language_shapes(layout), **vision_shapes(layout.hidden_size), **projection_shapes(layout, outputs)}
    total = 0
    for key, shape in shapes.items():
        layer = key.rsplit(".", 1)[0]
        fmt = target_format(policy, layer, shape) if key.endswith(".weight") else None
        numel = 1
        for d in shape:
            numel *= d
        total += weights.storage_nbytes(fmt, shape) if fmt else numel * stored_itemsize
    return total


def layout_from_shapes(path: str, shapes: dict[str, tuple[int, ...]]) -> GemmaLayout:
    """Gemma's sizes from its tensors' shapes; a file that is not a Gemma 3 language model is refused by name."""
    needed = (EMBEDDING + ".weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate_proj.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(f"{path}: not a Gemma 3 text encoder (no tensor {missing[0]!r}); the LTX-2 text encoder "
                              "is ComfyUI's gemma_3_12B_it file (text_encoders folder)")
    vocab, hidden = shapes[EMBEDDING + ".weight"]
    head_dim = shapes["model.layers.0.self_attn.q_norm.weight"][0]
    if head_dim != GEMMA3_12B.head_dim:
        raise CheckpointError(f"{path}: Gemma attention heads of {head_dim} features; ComfyUI's Gemma 3 builds "
                              f"{GEMMA3_12B.head_dim}")
    layers = 1 + max(int(m.group("layer")) for m in map(LINEAR_RE.match, (k.rsplit(".", 1)[0] for k in shapes)) if m)
    return GemmaLayout(vocab, hidden, shapes["model.layers.0.mlp.gate_proj.weight"][0], layers,
                       shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
                       shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim, head_dim)


class LegacyScaledFP8File:
    """A SafetensorsFile of ComfyUI's older scaled-FP8 layout (`scaled_fp8` marker, `<layer>.scale_weight`,
    `<layer>.scale_input`) read under the current names (`weight_scale`, `input_scale`), as ComfyUI's
    convert_old_quants renames them."""

    def __init__(self, f: SafetensorsFile):
        self.path, self.metadata, self._file = f.path, f.metadata, f
        self._names: dict[str, str] = {}
        for key in f.keys():
            if key == SCALED_FP8_MARKER:
                continue
            new = key
            for old, current in LEGACY_SCALE_NAMES.items():
                if key.endswith(old):
                    new = key[: -len(old)] + current
            self._names[new] = key
        self.tensors: dict[str, TensorInfo] = {new: f.tensors[old] for new, old in self._names.items()}

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        return self._file.read(self._names[name])


def readable(f: SafetensorsFile) -> SafetensorsFile | LegacyScaledFP8File:
    return LegacyScaledFP8File(f) if SCALED_FP8_MARKER in f else f


@dataclass
class LoadedTextEncoder:
    """State dicts for ComfyUI's LTX text encoder, each quantized layer with its `<layer>.comfy_quant`
    config tensor (what the pack's ops read), and the decisions behind them."""

    gemma: dict[str, torch.Tensor]
    projection: dict[str, torch.Tensor]
    decisions: list[LayerDecision]
    layout: GemmaLayout
    projection_outputs: dict[str, int]  # module name under text_embedding_projection -> output width ('' : single)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for sd in (self.gemma, self.projection) for k, t in sd.items()
                   if k != TOKENIZER_KEY and not k.endswith(".comfy_quant"))


def _convert(f, keys: list[str], policy: Policy, rename, device, progress, done_before: int, total: int,
             decisions: list[LayerDecision]) -> dict[str, torch.Tensor]:
    """Read `keys` of `f`, the policy's Linears quantized (core's convert_layer: NaN/Inf and bad scales
    refused by layer), everything else as stored. `rename` maps a file key to ComfyUI's module key."""
    info = inspect_checkpoint(f, require_ltx=False)
    wanted = set(keys)
    sources = {s.layer: s for s in info.layers.values() if s.keys["weight"] in wanted}
    planned = {d.layer: d for d in plan_text_encoder(policy, [(s.layer, s.shape, s.format, s.nbytes)
                                                             for s in sources.values()])}
    owned = {key: layer for layer, s in sources.items() for key in s.keys.values()}
    out: dict[str, torch.Tensor] = {}
    for index, key in enumerate(keys):
        layer = owned.get(key)
        if layer is None:
            out[rename(key)] = f.read(key) if key == TOKENIZER_KEY else refuse_nonfinite(f.path, key, f.read(key))
        elif key == sources[layer].keys["weight"]:
            source: LayerSource = sources[layer]
            decision = planned[layer]
            decisions.append(decision)
            if decision.target_format in weights.FORMATS:
                qw = convert_layer(f, source, decision.target_format, device)
                for suffix, tensor in qw.tensors.items():
                    out[rename(f"{layer}.{suffix}")] = tensor
                out[rename(f"{layer}.comfy_quant")] = conf_tensor(layer_conf(decision))
            else:
                out[rename(key)] = refuse_nonfinite(f.path, key, f.read(key), layer)
        if progress is not None:
            progress(done_before + index + 1, total)
    return out


def _projection_keys(f) -> list[str]:
    return [k for k in f.keys() if k.startswith(PROJECTION_PREFIX)]


def _projection_name(key: str) -> str:
    return PROJECTION_PREFIX + key[len(LEGACY_PROJECTION_PREFIX):] if key.startswith(LEGACY_PROJECTION_PREFIX) else key


def load_text_encoder(gemma_path: str, projection_path: str, policy: Policy, device: torch.device | str = "cpu",
                      progress=None) -> LoadedTextEncoder:
    """Read the Gemma file and the projection of an LTX checkpoint, quantizing as `policy` says,
    tensor by tensor (the bf16 model is never whole in memory). Refuses, naming the file, a Gemma file
    without Gemma 3's tensors or tokenizer and a checkpoint without the text projection, before any
    tensor is read."""
    with SafetensorsFile(gemma_path) as raw_gemma, SafetensorsFile(projection_path) as checkpoint:
        gemma = readable(raw_gemma)
        shapes = {k: tuple(gemma.tensors[k].shape) for k in gemma.keys()}
        layout = layout_from_shapes(gemma_path, shapes)
        if TOKENIZER_KEY not in gemma:
            raise CheckpointError(f"{gemma_path}: no {TOKENIZER_KEY!r} tensor (the Gemma tokenizer ComfyUI's "
                                  "text-encoder files carry); use ComfyUI's gemma_3_12B_it file")
        projection = readable(checkpoint)
        projection_keys = _projection_keys(projection)
        if not projection_keys:
            raise CheckpointError(f"{projection_path}: no {PROJECTION_PREFIX}* tensors: the LTX text projection comes "
                                  "from an LTX-2 checkpoint (checkpoints folder), as for LTXAVTextEncoderLoader")
        # Output width per projection module ('' for LTX-2's single projection).
        outputs = {_projection_name(k)[len(PROJECTION_PREFIX):-len("weight")].rstrip("."):
                   projection.tensors[k].shape[0] for k in projection_keys if k.endswith(".weight")}
        gemma_keys = gemma.keys()
        total = len(gemma_keys) + len(projection_keys)
        decisions: list[LayerDecision] = []
        gemma_state = _convert(gemma, gemma_keys, policy, lambda k: k, device, progress, 0, total, decisions)
        projection_state = _convert(projection, projection_keys, policy, _projection_name, device, progress,
                                    len(gemma_keys), total, decisions)
    return LoadedTextEncoder(gemma_state, projection_state, decisions, layout, outputs)
