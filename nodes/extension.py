from comfy_api.latest import ComfyExtension, io

from .loader import LTX2QuantLoader, LTX2QuantQuantizeModel, LTX2QuantSave
from .quality import LTX2QuantCalibrate, LTX2QuantQualityReport
from .sampling import LTX2QuantSigmas


class LTX2QuantExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LTX2QuantLoader, LTX2QuantQuantizeModel, LTX2QuantSave, LTX2QuantSigmas, LTX2QuantCalibrate,
                LTX2QuantQualityReport]
