"""The isolated loader: a version's pickle becomes a compiled predictor without the service
ever unpickling it.

The service has verified the version's signature and digest (``serving.store.reader``); the
bytes then go to a worker process (``serving.loader_worker``), forked from a fork server that
imported the model libraries once, so a worker starts in milliseconds. The worker limits its own
memory and CPU time before it reads a byte; the service stops it after a wall-clock limit; a
crash takes only the worker. What comes back is plain data (``serving.plain_data``), bounded in
size, from which the service rebuilds the predictor with NumPy alone and checks that it gives
the worker's answers on the check rows.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from dataclasses import dataclass

import numpy as np

from serving import loader_worker, plain_data
from serving.compiled import TOLERANCE, CompiledPredictor, NotCompilable
from serving.store.reader import VersionFiles


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 2 * 1024**3
    cpu_seconds: int = 60
    wall_seconds: float = 90.0
    result_bytes: int = 512 * 1024**2


class LoadError(Exception):
    """The version could not be made into a predictor; the message says why, for the API."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        """Not the version's fault (a busy machine, a killed worker): worth trying again."""


class Loader:
    """Loads versions in worker processes; safe to call from several threads at once."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["serving.loader_worker"])
        self._workers: set[multiprocessing.process.BaseProcess] = set()
        self._lock = threading.Lock()
        self._closed = False

    def warm_up(self) -> None:
        """Start the fork server and wait until it has imported the model libraries (seconds,
        once per service process), so that no version's time limit pays for it."""
        worker = self._context.Process(target=loader_worker.ready, name="loader warm-up",
                                       daemon=True)
        worker.start()
        worker.join()
        worker.close()

    def close(self) -> None:
        """Stop every worker still running, and start no more."""
        with self._lock:
            self._closed = True
            for worker in self._workers:
                worker.kill()

    def load(self, files: VersionFiles) -> CompiledPredictor:
        result = self._run_worker(files)
        if not result.get("ok"):
            error = str(result.get("error"))[:2000]
            if error == loader_worker.MEMORY_ERROR:
                error = (f"loading it needed more than {self.limits.memory_bytes // 1024**2} MB "
                         "(SERVING_LOADER_MEMORY_MB); stopped")
            raise LoadError(f"refused by the loader: {error}")
        try:
            predictor = CompiledPredictor.from_spec(result["spec"],
                                                   n_classes=len(files.info.classes))
            _check_answers(predictor, result["expected"], len(files.info.classes))
        except (KeyError, TypeError, ValueError, IndexError, NotCompilable) as exc:
            raise LoadError(f"the loader's result was refused: {exc}") from None
        return predictor

    def _run_worker(self, files: VersionFiles) -> dict:
        limits = self.limits
        receiver, sender = self._context.Pipe(duplex=False)
        worker = self._context.Process(
            target=loader_worker.run, name=f"loader {files.info.model_name}",
            args=(sender, files.payload, len(files.info.classes),
                  files.info.metadata.get("versions") or {}, limits.memory_bytes,
                  limits.cpu_seconds),
            daemon=True,
        )
        timed_out = threading.Event()

        def stop_worker() -> None:
            timed_out.set()
            worker.kill()

        # The wall-clock limit holds however the worker sends: also one that starts its answer
        # and then never finishes it.
        deadline = threading.Timer(limits.wall_seconds, stop_worker)
        timeout = LoadError(f"the loader took longer than {limits.wall_seconds:g} s "
                            "(SERVING_LOADER_TIMEOUT_SECONDS); stopped", transient=True)
        try:
            with self._lock:
                if self._closed:
                    raise LoadError("the service is stopping", transient=True)
                try:
                    worker.start()
                except OSError as exc:
                    raise LoadError(f"the loader could not start ({exc.strerror})",
                                    transient=True) from None
                self._workers.add(worker)
            deadline.start()
            sender.close()
            if not receiver.poll(limits.wall_seconds):
                raise timeout
            try:
                # Bytes only: nothing the worker sends is ever unpickled here.
                data = receiver.recv_bytes(maxlength=limits.result_bytes)
            except EOFError:
                if timed_out.is_set():
                    raise timeout from None
                worker.join(timeout=5)
                raise _how_it_ended(worker.exitcode, limits) from None
            except OSError:
                raise LoadError(f"the loader's result is larger than "
                                f"{limits.result_bytes // 1024**2} MB; refused") from None
        finally:
            deadline.cancel()
            with self._lock:
                self._workers.discard(worker)
            if worker.pid is not None and worker.is_alive():
                worker.kill()
            if worker.pid is not None:
                worker.join()
                worker.close()
            receiver.close()
        try:
            result = plain_data.decode(data, max_bytes=limits.result_bytes)
        except ValueError as exc:
            raise LoadError(f"the loader's result was refused: {exc}") from None
        if not isinstance(result, dict):
            raise LoadError("the loader's result was refused: not an object")
        return result


def _how_it_ended(exitcode: int | None, limits: Limits) -> LoadError:
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        if number == signal.SIGXCPU:
            return LoadError(f"the loader used more than {limits.cpu_seconds} s of CPU "
                             "(SERVING_LOADER_CPU_SECONDS); stopped")
        name = signal.Signals(number).name if number in signal.valid_signals() else number
        # SIGKILL comes from outside (the kernel's out-of-memory killer, an operator): the
        # version may well load next time. A SIGSEGV or SIGABRT is the pickle's doing.
        return LoadError(f"the loader crashed ({name}) while loading it",
                         transient=number == signal.SIGKILL)
    return LoadError(f"the loader ended (exit status {exitcode}) without a result",
                     transient=True)


def _check_answers(predictor: CompiledPredictor, expected: dict, n_classes: int) -> None:
    """The rebuilt predictor must give, on the check rows, exactly the worker's answers (the
    worker compared those with the pipeline's own)."""
    rows, codes, probabilities = expected["rows"], expected["codes"], expected["probabilities"]
    if not (isinstance(rows, list) and rows and len(rows) <= 10_000
            and isinstance(codes, np.ndarray) and isinstance(probabilities, np.ndarray)
            and codes.shape == (len(rows),) and probabilities.shape == (len(rows), n_classes)):
        raise ValueError("its check answers are not of the expected shapes")
    got_codes, got_probabilities = predictor.predict(rows)
    if not (np.array_equal(got_codes, codes) and np.array_equal(got_probabilities, probabilities)):
        raise ValueError("the rebuilt predictor does not give the loader's answers")
    # Its one-row path is its own arithmetic: the same classes, the probabilities to TOLERANCE.
    for row, code, expected_row in zip(rows, codes.tolist(), probabilities, strict=True):
        got_code, got_row = predictor.predict_one(row)
        if got_code != code or not np.abs(np.subtract(got_row, expected_row)).max() <= TOLERANCE:
            raise ValueError("the rebuilt predictor, one row at a time, does not give the "
                             "loader's answers")
    if not np.all(np.isfinite(got_probabilities)):
        raise ValueError("it answers probabilities that are not finite numbers")
