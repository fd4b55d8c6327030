"""The driver's side of stopping a run on request (:mod:`maskray.engine.stopping` has the whole story and the
workers' side): the named :class:`StopRequest` actor and the SIGTERM handler that sets it. Imports neither torch
nor the rest of the engine, so that the actor's process starts in a fraction of a second."""

from __future__ import annotations

import os
import signal
import sys
import threading

DRIVER_REQUEST = "SIGTERM to the driver"


class StopRequest:
    """The driver's stop request (run as a Ray actor): set once by the driver, read by rank 0."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> str | None:
        return self.reason


def stop_request_name(run_id: str) -> str:
    return f"maskray-stop-{run_id}"


class DriverStop:
    """The named :class:`StopRequest` actor and the driver's SIGTERM handler that sets it, for one run.

    The first SIGTERM prints one line and asks the workers to checkpoint and return; a second one exits at
    once (code 143). The handler is only installed in the main thread (a Tune trial runs the driver in
    another one, and Tune handles its own signals). :meth:`close` puts back the SIGTERM and SIGINT handlers
    the driver had before the run and ends the actor."""

    def __init__(self, run_id: str) -> None:
        import ray

        self.name = stop_request_name(run_id)
        self.actor = ray.remote(num_cpus=0)(StopRequest).options(name=self.name, get_if_exists=True).remote()
        self.requested = threading.Event()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            # SIGINT: Ray Train's fit() installs a handler that holds its controller actor's handle, which keeps
            # that actor alive after the run; restoring the driver's own handler in close() releases it
            previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
                        signal.SIGINT: signal.getsignal(signal.SIGINT)}
            self._previous = {signum: handler for signum, handler in previous.items() if handler is not None}

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested.is_set():
            print("stopped: second SIGTERM, exiting without waiting for the checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)
        self.requested.set()
        print("SIGTERM: the workers checkpoint at their next step, then the run stops (SIGTERM again: exit now)",
              file=sys.stderr, flush=True)
        # not from inside the handler: it interrupts the main thread in the middle of a Ray call
        threading.Thread(target=self.actor.request.remote, args=(DRIVER_REQUEST,), daemon=True).start()

    def close(self) -> None:
        import ray

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        ray.kill(self.actor)
