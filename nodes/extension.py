from comfy_api.latest import ComfyExtension, io

from . import web_routes
from .decode_nodes import LTX2QuantVAEDecode
from .model_nodes import LTX2QuantLoader, LTX2QuantQuantizeModel, LTX2QuantSave, LTX2QuantVAELoader
from .multi_gpu_nodes import LTX2QuantMultiGPU
from .patch_nodes import LTX2QuantAttention, LTX2QuantCompile
from .quality_nodes import LTX2QuantCalibrate, LTX2QuantQualityReport
from .sampling_nodes import LTX2QuantLatentUpscale, LTX2QuantSigmas, LTX2QuantTwoStageSampler
from .text_encoder_nodes import LTX2QuantTextEncoderLoader


class LTX2QuantExtension(ComfyExtension):
    async def on_load(self) -> None:
        web_routes.register()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LTX2QuantLoader, LTX2QuantQuantizeModel, LTX2QuantSave, LTX2QuantSigmas,
                LTX2QuantVAELoader, LTX2QuantTwoStageSampler, LTX2QuantLatentUpscale,
                LTX2QuantCompile, LTX2QuantCalibrate,
                LTX2QuantQualityReport, LTX2QuantAttention, LTX2QuantTextEncoderLoader,
                LTX2QuantVAEDecode, LTX2QuantMultiGPU]
