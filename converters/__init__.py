"""Command-line checkpoint converters: `python -m converters.gguf_to_hf`, `python -m converters.hf_to_jaxllm`."""
