"""Someone's KL function, run where it cannot harm the checker: in a worker process.

``kl-bench check`` sends each case set's inputs (copies: the function may overwrite them) to a
worker forked from a clean server process, which converts them to the chosen backend, calls the
function and sends back float64 results. Whatever the function does, exiting (``SystemExit``,
``os._exit``), crashing the interpreter (a segfault) or never returning (past ``timeout``
seconds), the checker sees it as that call's failure, starts a fresh worker and goes on; the
verdict and the exit code stay the checker's.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass

import numpy as np

from .subjects import Subject, describe

DEFAULT_TIMEOUT = 60.0  # seconds for one call (one case set)


@dataclass(frozen=True)
class UserFunction(Subject):
    """Someone's function, called exactly like ``kl_bench.kl_<family>``."""

    fn: object = None
    method: str = ""

    implementation = "user"

    @property
    def name(self) -> str:
        return f"{target_name(self.fn)}[{self.backend}-{self.device}]"

    def function(self, family):
        return self.fn


def target_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _serve(conn, payload: bytes, backend: str) -> None:
    """The worker: call the function on each request, answer ("ok", float64 values) or ("raised", why)."""
    import cloudpickle

    os.dup2(2, 1)  # the function's prints go to stderr: stdout is the checker's report
    subject = UserFunction(backend=backend, fn=cloudpickle.loads(payload))
    while True:
        try:
            family, arrays, dtype = conn.recv()
        except EOFError:
            return
        try:
            with np.errstate(all="ignore"):
                answer = ("ok", np.asarray(subject.run(family, arrays, dtype), dtype=np.float64))
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the function's too
            answer = ("raised", describe(exc))
        conn.send(answer)


class Isolated:
    """A function behind a worker process: ``call`` returns (float64 values or None, problem)."""

    def __init__(self, fn, backend: str, timeout: float = DEFAULT_TIMEOUT):
        import cloudpickle

        self.payload = cloudpickle.dumps(fn)  # by reference where importable, by value (closures, lambdas) otherwise
        self.backend, self.timeout = backend, timeout
        self.process = self.conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.payload, self.backend), daemon=True)
        self.process.start()
        child.close()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
        self.process = self.conn = None

    def call(self, family: str, arrays, dtype: str):
        if self.process is None:
            self._start()
        try:
            self.conn.send((family, [np.array(a) for a in arrays], dtype))
            if not self.conn.poll(self.timeout):
                self._stop()
                return None, f"gave no result within {self.timeout:g} s (stopped; --timeout sets the limit)"
            kind, value = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join(5)
            code = self.process.exitcode
            self._stop()
            return None, _ended(code)
        return (value, "") if kind == "ok" else (None, f"raised {value}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop()


def _ended(code) -> str:
    if code is not None and code < 0:
        try:
            return f"crashed the process ({signal.Signals(-code).name})"
        except ValueError:
            return f"crashed the process (signal {-code})"
    return f"ended the process (exit code {code})"
