"""`jaxllm serve`: an OpenAI-compatible HTTP server over one `LLM` (the `serve` extra).

  protocol.py   request models, OpenAI's error schema, request -> SamplingParams
  endpoints.py  completions and chat without HTTP: body -> prompts and params, outputs -> response body
  app.py        the FastAPI routes (completions, chat, models, tokenize, metrics, health)
  metrics.py    Prometheus metrics (vLLM's names, `jaxllm:` prefix)
  server.py     uvicorn, loading in the background, draining on SIGTERM

`import jaxllm` never imports this package: FastAPI and uvicorn are optional.
"""
