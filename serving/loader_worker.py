"""The isolated loader's worker: runs in a child process of its own, never in the service.

It limits itself first (memory, CPU time, no file growth, no new processes), then unpickles one
verified version with the exact allow-list, checks it is a penguins model of the contract's
features, compiles it, checks the compiled predictor against the pipeline, and sends back only
plain data (``serving.plain_data``): the compiled predictor's parameters and its answers on the
check rows. Any failure is sent back as a message; a crash or a limit ends the process, which the
parent (``serving.loader``) reports.
"""

from __future__ import annotations

import os

# Before NumPy and the model libraries are imported: one thread each, as in the service.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import resource  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from typing import Any  # noqa: E402

import numpy  # noqa: E402, F401 - imported once in the fork server, not in every worker
import sklearn  # noqa: E402
import sklearn.calibration  # noqa: E402, F401
import sklearn.compose  # noqa: E402, F401
import sklearn.ensemble  # noqa: E402, F401
import sklearn.linear_model  # noqa: E402, F401
import sklearn.neighbors  # noqa: E402, F401
import sklearn.pipeline  # noqa: E402, F401
import sklearn.svm  # noqa: E402, F401
import xgboost  # noqa: E402

from serving import plain_data  # noqa: E402
from serving.contract import FEATURES  # noqa: E402
from serving.predictors import compile_checked  # noqa: E402
from serving.unpickler import load_model_pickle  # noqa: E402

MEMORY_ERROR = "memory"
"""The ``error`` code of a worker that ran out of its memory allowance."""


def ready() -> None:
    """Nothing: a worker started once so that the fork server is up (``Loader.warm_up``)."""


def run(connection: Connection, payload: bytes, n_classes: int, trained_with: dict[str, Any],
        memory_bytes: int, cpu_seconds: int) -> None:
    """Load ``payload`` and send the result over ``connection`` as plain data."""
    _limit_self(memory_bytes, cpu_seconds)
    try:
        result: dict[str, Any] = {"ok": True, **_compile(payload, n_classes, trained_with)}
    except MemoryError:
        result = {"ok": False, "error": MEMORY_ERROR}
    except Exception as exc:  # everything about a bad model is the model's fault
        result = {"ok": False, "error": f"{exc}"[:2000] or type(exc).__name__}
    connection.send_bytes(plain_data.encode(result))
    connection.close()


def _compile(payload: bytes, n_classes: int, trained_with: dict[str, Any]) -> dict[str, Any]:
    ours = {"scikit-learn": sklearn.__version__, "xgboost": xgboost.__version__}
    if trained_with.get("scikit-learn") != ours["scikit-learn"]:
        trained = str(trained_with.get("scikit-learn"))[:20]
        raise ValueError(f"it was trained with scikit-learn {trained}, this service runs "
                         f"{ours['scikit-learn']}; pickles do not load reliably across "
                         "versions (retrain, or run both with the same uv.lock)")
    model = load_model_pickle(payload)
    fitted_on = getattr(model, "feature_names_in_", None)
    if fitted_on is None or list(fitted_on) != list(FEATURES):
        raise ValueError(f"it was fitted on the features "
                         f"{'(unnamed)' if fitted_on is None else list(fitted_on)[:20]}, "
                         f"not on {list(FEATURES)}")
    steps = getattr(model, "steps", None) or []
    if any(type(step).__module__.startswith("xgboost") for _, step in steps) and (
            trained_with.get("xgboost") != ours["xgboost"]):
        raise ValueError(f"it was trained with xgboost {str(trained_with.get('xgboost'))[:20]}, "
                         f"this service runs {ours['xgboost']}; XGBoost pickles are not portable")
    spec, expected = compile_checked(model, n_classes)
    return {"spec": spec, "expected": expected}


def _limit_self(memory_bytes: int, cpu_seconds: int) -> None:
    # Address space: what the fork server had mapped already, plus the allowance.
    resource.setrlimit(resource.RLIMIT_AS, (_mapped_bytes() + memory_bytes,) * 2)
    # SIGXCPU at the soft limit; SIGKILL a second later if it is caught.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # No file may be written to (an allowed class opened in a write mode), and, for a user that
    # is not root, no process started.
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")
