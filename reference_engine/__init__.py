"""The bundled reference engine: a real paged-KV, continuously batched Llama-family server (run as its own process)."""
