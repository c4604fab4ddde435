"""Running the app: uvicorn on one port, the LLM loaded in the background, SIGTERM drained.

The port opens at once and answers 503 (/health included) while the LLM loads, so an orchestrator
can tell "starting" from "down". SIGTERM or Ctrl-C marks the server draining (new requests get
503), stops accepting connections, lets in-flight requests finish for up to `drain_timeout`
seconds (uvicorn's graceful shutdown), then shuts the LLM down; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Callable

import uvicorn

from jaxllm.serve.app import ServerState, create_app

logger = logging.getLogger("jaxllm")


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the state draining as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.serve_state = state

    def handle_exit(self, sig, frame) -> None:
        self.serve_state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, so the process would die of it; a
        # drained SIGTERM is a clean exit (status 0).
        captured = getattr(self, "_captured_signals", [])
        if sig == signal.SIGTERM and sig in captured:
            captured.remove(sig)


def build_server(state: ServerState, host: str, port: int, drain_timeout: float,
                 load_llm: Callable[[], object] | None = None, log_level: str = "info") -> uvicorn.Server:  # fmt: skip
    """A uvicorn server for `state`'s app. `load_llm` (run in a worker thread at start-up) makes
    the LLM when `state.llm` is not set yet, and the server shuts it down at exit; a failure stops
    the server (exit status 1). An LLM given in `state.llm` stays the caller's."""
    app = create_app(state)
    loading: list[asyncio.Task] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        owned = load_llm is not None and state.llm is None
        if owned:
            loading.append(asyncio.create_task(_load(state, load_llm, server)))
        yield
        state.draining = True
        for task in loading:
            task.cancel()
        if owned and state.llm is not None:
            await asyncio.to_thread(state.llm.shutdown)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            access_log=False)  # fmt: skip
    server = _DrainingServer(config, state)
    return server


async def _load(state: ServerState, load_llm, server: _DrainingServer) -> None:
    try:
        state.llm = await asyncio.to_thread(load_llm)
        logger.info("serving %s", state.model_name)
    except Exception as e:
        logger.error("the model failed to load: %s: %s", type(e).__name__, e)
        server.load_failed = True
        server.should_exit = True


def run(state: ServerState, host: str, port: int, drain_timeout: float, load_llm=None) -> int:
    """Serve until SIGTERM / Ctrl-C; the exit status (0 after a drain, 1 if the model did not load)."""
    server = build_server(state, host, port, drain_timeout, load_llm)
    server.load_failed = False
    server.run()
    return 1 if server.load_failed else 0
