"""Quantization policies: which layers get which format, and how activations are treated.

A policy is data. `plan()` turns it and a list of (layer, shape) into per-layer decisions that the
checkpoint writer, the ComfyUI loader and the reports all share.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from . import weights
from .ltx2 import BLOCK_LINEAR_RE, CONNECTOR_LINEAR_RE, is_audio_side, reads_few_tokens
from .modes import Activation
from .outliers import NONE as NO_OUTLIER_HANDLING, Outliers


@dataclass(frozen=True)
class Scope:
    """Which Linear weights a policy quantizes.

    Default: the block Linears of the LTX-2/2.3 transformer (`transformer_blocks.N.{attn1,attn2,
    audio_attn1,audio_attn2,audio_to_video_attn,video_to_audio_attn}.{to_q,to_k,to_v,to_out.0}`,
    `ff`/`audio_ff` `net.0.proj`/`net.2`); with `connectors` also the text connectors' Linears
    (ltx2.CONNECTOR_LINEAR_RE; always 8-bit and weight-only, see Policy.outer_format), otherwise kept
    in high precision like AdaLN, the scale-shift tables, norms, `to_gate_logits` and patchify/proj_out.
    `include`/`exclude` are fnmatch patterns on the unprefixed layer name (exclude wins);
    `weight_only` patterns make quantized layers run without 8-bit activations (see plan()).
    `audio_8bit` and `eight_bit` (patterns) put selected block Linears in the policy's 8-bit format
    (Policy.outer_format) instead of 4-bit NVFP4: a mixed NVFP4/FP8 model; other policies are 8-bit
    already."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    keep_audio: bool = False
    connectors: bool = False
    weight_only: tuple[str, ...] = ()
    audio_8bit: bool = False
    eight_bit: tuple[str, ...] = ()

    def selects(self, layer: str, num_blocks: int) -> bool:
        if any(fnmatch.fnmatchcase(layer, p) for p in self.exclude):
            return False
        match = BLOCK_LINEAR_RE.match(layer)
        if match is None:
            return (self.connectors and CONNECTOR_LINEAR_RE.match(layer) is not None) or any(
                fnmatch.fnmatchcase(layer, p) for p in self.include)
        block = int(match.group("block"))
        if block < self.keep_first_blocks or block >= num_blocks - self.keep_last_blocks:
            return False
        if self.keep_audio and is_audio_side(layer):
            return False
        return True

    def wants_8bit(self, layer: str) -> bool:
        return (self.audio_8bit and is_audio_side(layer)) or any(fnmatch.fnmatchcase(layer, p) for p in self.eight_bit)


@dataclass(frozen=True)
class Policy:
    name: str
    weight_format: str | None
    activation: Activation = Activation.NONE  # what its block Linears' activations become where the GPU can
    scope: Scope = field(default_factory=Scope)
    outer_fp8_per_tensor: bool = False  # NVFP4 policies: their FP8 outer layers with one scale per tensor
    # Smoothing and the low-rank branch for the block Linears in the policy's own format (quant.outliers).
    # Applied by whatever quantizes with LayerDecision.outliers (conversion, quality.file_layer_quality);
    # every execution path runs them (runtime.run).
    outliers: Outliers = NO_OUTLIER_HANDLING

    def with_scope(self, **changes) -> "Policy":
        """The policy with its scope changed: patterns (tuples) add to the scope's own, the other fields
        are replaced."""
        merged = {k: (*getattr(self.scope, k), *v) if isinstance(getattr(self.scope, k), tuple) else v
                  for k, v in changes.items()}
        return replace(self, scope=replace(self.scope, **merged))

    @property
    def outer_format(self) -> str | None:
        """The format of in-scope Linears outside the blocks (the text connectors) and of the block
        Linears the scope wants 8-bit: the policy's own, except that 4-bit NVFP4 becomes FP8 there
        (every prompt token passes all 8 connector layers before any block sees it)."""
        if self.weight_format != weights.NVFP4:
            return self.weight_format
        return weights.FP8_TENSOR if self.outer_fp8_per_tensor else weights.FP8_ROWWISE

    def with_fp8_per_tensor(self) -> "Policy":
        """Per-tensor FP8 scales: the only FP8 layout stock ComfyUI reads."""
        if self.weight_format == weights.FP8_ROWWISE:
            return replace(self, weight_format=weights.FP8_TENSOR)
        if self.weight_format == weights.NVFP4:
            return replace(self, outer_fp8_per_tensor=True)
        return self


# The audio->video cross-attention (video queries, audio keys and values) carries more FP8 error per byte
# than any other module: keeping it in bf16 cut fp8-scaled-mm's video error by 11-16% on the 48-block model
# (H200, two weight seeds), to 7-17% below core's pre-quantized fp8 (docs/QUALITY.md, "Full-size model on an H200").
KEEP_AUDIO_TO_VIDEO_ATTENTION = ("*.audio_to_video_attn.*",)
# fp8-scaled-mm keeps only the layers of it that carry that error: to_out.0 and to_v (the CPU study, -12%
# and -8% of the -20%), with to_k. Its video-token to_q runs W8A8: on the 48-block model at 24,576 tokens
# the same error (0.0339 / 0.0291 vs 0.0340 / 0.0291), 0.4 GiB less and ~0.5% faster (docs/BENCHMARKS.md,
# "Whole step on Hopper").
FP8_SCALED_MM_KEEPS = ("*.audio_to_video_attn.to_k", "*.audio_to_video_attn.to_v", "*.audio_to_video_attn.to_out.0")

POLICIES: dict[str, Policy] = {
    "bf16": Policy("bf16", None),
    "fp8-cast": Policy("fp8-cast", weights.FP8_ROWWISE, Activation.NONE),
    "fp8-scaled-mm": Policy("fp8-scaled-mm", weights.FP8_ROWWISE, Activation.FP8,
                            Scope(exclude=FP8_SCALED_MM_KEEPS)),
    # INT8 W8A8: per-output-row INT8 weights, per-token INT8 activations; INT8 tensor cores run on every
    # NVIDIA GPU from Turing on (2x bf16 on Ampere). `int8-convrot` also rotates each 256-feature group
    # of the input by a Hadamard (ComfyUI's ConvRot: folded into the weights at load, applied to the
    # activations inside their quantization kernel), which spreads outlier channels over the group.
    "int8-scaled-mm": Policy("int8-scaled-mm", weights.INT8, Activation.INT8),
    "int8-convrot": Policy("int8-convrot", weights.INT8_CONVROT, Activation.INT8),
    "mxfp8": Policy("mxfp8", weights.MXFP8, Activation.FP8),
    # W4A4 on Blackwell; on Ada/Hopper the nvfp4_mode `fast` expands weights to FP8 per call (W8A8).
    "nvfp4": Policy("nvfp4", weights.NVFP4, Activation.NVFP4),
}


def get_policy(name: str, *, fp8_per_tensor: bool = False, policy_scope: bool = True, **scope_changes) -> Policy:
    """The named policy with `scope_changes` applied to its own scope (Policy.with_scope); with
    `policy_scope=False` they apply to the plain Scope instead: every block Linear, no policy exclusions."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    policy = POLICIES[name]
    if not policy_scope:
        policy = replace(policy, scope=Scope())
    if fp8_per_tensor:
        policy = policy.with_fp8_per_tensor()
    if scope_changes:
        policy = policy.with_scope(**{k: tuple(v) if isinstance(v, list) else v for k, v in scope_changes.items()})
    return policy


@dataclass(frozen=True)
class LayerDecision:
    layer: str
    shape: tuple[int, ...]
    source_format: str  # a torch dtype name for plain weights, else a format name
    target_format: str  # same as source_format when the layer is left as it is
    bytes_before: int
    bytes_after: int
    # Runs dequantize + high-precision matmul, never 8-bit activations (ComfyUI's
    # `full_precision_matrix_mult`): every layer of fp8-cast, and the few-token layers of the others
    # (ltx2.reads_few_tokens). The block Linears an NVFP4 scope puts in FP8 (Scope.wants_8bit) that
    # read video tokens run W8A8, as its NVFP4 layers do on the fast path.
    weight_only: bool = False
    outliers: Outliers = NO_OUTLIER_HANDLING  # the policy's, on its own-format block Linears

    @property
    def changed(self) -> bool:
        return self.target_format != self.source_format


def plan(policy: Policy, layers: list[tuple[str, tuple[int, ...], str, int]], num_blocks: int) -> list[LayerDecision]:
    """Decide each weight: `layers` holds (unprefixed layer name, logical shape, source format, bytes).

    A plain floating-point 2-D weight in scope gets the policy's format. Already-quantized layers
    keep their format unless the policy asks for a different one (then they are re-quantized)."""
    decisions = []
    for layer, shape, source, nbytes in layers:
        target = source
        mixed_8bit = False  # a block Linear an NVFP4 scope puts in FP8: W8A8, like the fast path's NVFP4
        handling = NO_OUTLIER_HANDLING
        if policy.weight_format is not None and len(shape) == 2 and policy.scope.selects(layer, num_blocks):
            in_block = BLOCK_LINEAR_RE.match(layer) is not None
            eight_bit = in_block and policy.scope.wants_8bit(layer)
            target = policy.weight_format if in_block and not eight_bit else policy.outer_format
            mixed_8bit = eight_bit and policy.weight_format == weights.NVFP4
            target = weights.fitting_format(target, shape)
            if in_block and not eight_bit:
                handling = policy.outliers
        after = nbytes if target == source else weights.storage_nbytes(target, shape)
        # The FP8 layers of a policy that is not W8A8 FP8 (fp8-cast's, an NVFP4 policy's connectors and
        # `include`d outer layers) run weight-only; layers a policy keeps as the file has them keep the file's flag
        # (conversion.plan_conversion) besides the few-token rule.
        weight_only = target in weights.FORMATS and (
            reads_few_tokens(layer) or any(fnmatch.fnmatchcase(layer, p) for p in policy.scope.weight_only)
            or (target != source and policy.activation != Activation.FP8 and not mixed_8bit
                and target in weights.FP8_FORMATS))
        decisions.append(LayerDecision(layer, tuple(shape), source, target, nbytes, after, weight_only,
                                       handling if target != source else NO_OUTLIER_HANDLING))
    return decisions


def summarize(decisions: list[LayerDecision]) -> dict:
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.target_format] = counts.get(d.target_format, 0) + 1
    before = sum(d.bytes_before for d in decisions)
    after = sum(d.bytes_after for d in decisions)
    return {"layers_by_format": counts, "bytes_before": before, "bytes_after": after,
            "ratio": before / after if after else 1.0}


def format_table(decisions: list[LayerDecision], only_changed: bool = False) -> str:
    """Per-layer decision table: layer, shape, format before -> after, bytes before/after."""
    rows = [d for d in decisions if d.changed or not only_changed]
    header = ("layer", "shape", "format", "bytes before", "bytes after")
    body = [(d.layer, "x".join(map(str, d.shape)),
             d.source_format if not d.changed else f"{d.source_format} -> {d.target_format}",
             f"{d.bytes_before:,}", f"{d.bytes_after:,}") for d in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]
    s = summarize(decisions)
    lines.append(f"total: {s['bytes_before']:,} -> {s['bytes_after']:,} bytes "
                 f"({s['ratio']:.2f}x smaller); layers by format: {s['layers_by_format']}")
    return "\n".join(lines)
