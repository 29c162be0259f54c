"""ComfyUI nodes of LTX-2 Quant (V3 API). The extension lives in nodes/extension.py so that the
plain functions here (model_io, ops) import without ComfyUI's node API (benchmarks use them)."""
