"""Someone's KL function, run where it cannot harm the checker: in a worker process.

``kl-bench check`` sends each case set's inputs (copies: the function may overwrite them) to a
worker, a fresh Python interpreter, which converts them to the chosen backend, calls the function
and sends back float64 results (or the gradients of their sum). Whatever the function does,
exiting (``SystemExit``, ``os._exit``), crashing the interpreter (a segfault) or never returning
(past ``timeout`` seconds), the checker sees it as that call's failure, starts a fresh worker and
goes on; the verdict and the exit code stay the checker's.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from .subjects import Subject, describe

DEFAULT_TIMEOUT = 60.0  # seconds for one call (one case set)
VALUES, GRADIENT, GRADIENT_JIT = "values", "gradient", "gradient-jit"  # what a call asks for


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


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    return pickle.loads(stream.read(int.from_bytes(header, "little")))


def _serve() -> None:
    """The worker (``python -m kl_bench.suite.isolation``): the function first, then one answer per
    request, ("ok", float64 values or gradients) or ("raised", why)."""
    import cloudpickle

    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the function's prints go to stderr: stdout carries the answers
    path, payload, backend = _receive(requests)
    sys.path[:] = path  # the caller's: the function's module imports as it did there
    subject = UserFunction(backend=backend, fn=cloudpickle.loads(payload))
    while True:
        try:
            what, family, arrays, dtype = _receive(requests)
        except EOFError:
            return
        try:
            with np.errstate(all="ignore"):
                if what == VALUES:
                    answer = ("ok", np.asarray(subject.run(family, arrays, dtype), dtype=np.float64))
                else:  # the gradient of the sum, eagerly or compiled
                    answer = ("ok", subject.gradient(family, arrays, dtype, jit=what == GRADIENT_JIT))
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the function's too
            answer = ("raised", describe(exc))
        _send(answers, answer)


class Isolated:
    """A function behind a worker process: ``call`` returns (float64 values or None, problem)."""

    def __init__(self, fn, backend: str, timeout: float = DEFAULT_TIMEOUT):
        import cloudpickle

        self.payload = cloudpickle.dumps(fn)  # by reference where importable, by value (closures, lambdas) otherwise
        self.backend, self.timeout = backend, timeout
        self.process = None

    def _start(self) -> None:
        # A fresh interpreter: nothing of this process (threads of Torch or JAX, the __main__ module) in it.
        self.process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _send(self.process.stdin, (list(sys.path), self.payload, self.backend))

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
        self.process = None

    def call(self, family: str, arrays, dtype: str, what: str = VALUES):
        """The function's values (``VALUES``) or the gradient of their sum with respect to each
        argument (``GRADIENT``, ``GRADIENT_JIT``), as float64, or None and what went wrong."""
        if self.process is None:
            self._start()
        try:
            _send(self.process.stdin, (what, family, list(arrays), dtype))  # pickled: the worker gets its own copies
            ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
            if not ready:
                self._stop()
                return None, f"gave no result within {self.timeout:g} s (stopped; --timeout sets the limit)"
            kind, value = _receive(self.process.stdout)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self.process.wait()
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


if __name__ == "__main__":
    _serve()
