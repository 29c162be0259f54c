"""Helpers of the real-ComfyUI integration tests: the server harness (comfy_server), fault injection
(faults, and comfy_fault_nodes installed into the server), the tiny model builders and scripts that run
in a fresh process (make_tiny_models, connector_streaming_check), the multi-process ranks
(multi_gpu_ranks) and test-only nodes (comfy_test_nodes)."""
