"""LTX-2 Quant: ComfyUI entry point. The quantization core is in quant/ (no ComfyUI imports)."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import LTX2QuantExtension
    return LTX2QuantExtension()
