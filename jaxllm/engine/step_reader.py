"""The reader thread: a dispatched step's outputs are read to the host here, so that the engine
thread waits on its wake event meanwhile and can act on aborts while the step runs."""

from __future__ import annotations

import concurrent.futures
import queue
import threading

from jaxllm.engine.runner import PendingStep


class StepReader:
    """A thread that reads dispatched steps' outputs to the host (blocking inside XLA, the GIL
    released), so that the engine thread waits on its wake event instead and can act on aborts
    while a step runs. One read at a time: the engine waits for each before the next."""

    def __init__(self, wake: threading.Event):
        self._wake = wake
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (PendingStep, Future), or None to stop
        self._thread = threading.Thread(target=self._run, name="jaxllm-step-reader", daemon=True)
        self._thread.start()

    def read(self, pending: PendingStep) -> concurrent.futures.Future:
        """Start reading `pending`; the future holds its host outputs (`PendingStep.result`), and
        the wake event is set once it is done."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((pending, done))
        return done

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            pending, done = job
            try:
                done.set_result(pending.result())
            except BaseException as e:  # the engine thread re-raises it as the step's error
                done.set_exception(e)
            self._wake.set()

    def close(self, timeout: float | None = 30.0) -> None:
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
