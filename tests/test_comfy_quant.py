"""ComfyUI's per-layer quantization config (quant/comfy_quant.py): as a state-dict tensor, in the header
and re-formatted. Reading it from files, damaged ones included, is tested in test_checkpoint.py and
test_reliability.py."""

import json

from quant import comfy_quant, weights
from quant.policies import get_policy, plan

LAYER = "transformer_blocks.0.attn1.to_q"


def test_a_conf_tensor_holds_the_json_comfyui_reads():
    conf = {"format": "nvfp4", "shape": [64, 32], "full_precision_matrix_mult": True}
    tensor = comfy_quant.conf_tensor(conf)
    assert bytes(tensor.tolist()).decode("utf-8") == json.dumps(conf)
    assert comfy_quant.conf_from_tensor(tensor) == conf


def test_the_header_entry_is_replaced_and_dropped_when_no_layer_is_quantized():
    old = {"config": "{}", comfy_quant.QUANT_METADATA_KEY: '{"layers": {"gone": {}}}'}
    new = comfy_quant.with_layer_confs(old, {LAYER: {"format": "float8_e4m3fn"}})
    assert json.loads(new[comfy_quant.QUANT_METADATA_KEY]) == {"format_version": "1.0",
                                                               "layers": {LAYER: {"format": "float8_e4m3fn"}}}
    assert new["config"] == "{}" and "gone" in old[comfy_quant.QUANT_METADATA_KEY]
    assert comfy_quant.with_layer_confs(old, {}) == {"config": "{}"}


def test_layer_conf_names_the_format_and_reads_back_as_it():
    [decision] = [d for d in plan(get_policy("int8-convrot"), [(LAYER, (64, 256), "BF16", 0)], 1)]
    conf = comfy_quant.layer_conf(decision)
    assert weights.format_from_conf(conf) == weights.INT8_CONVROT and conf["shape"] == [64, 256]
    fp8 = comfy_quant.conf_in_format(conf, weights.FP8_TENSOR)
    assert fp8 == {"shape": [64, 256], "format": weights.FP8_TENSOR}
    assert weights.format_from_conf(fp8) == weights.FP8_TENSOR
