"""The promotion gate: whether a newly trained version may replace the promoted one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_MIN_ACCURACY = 0.9
DEFAULT_MAX_REGRESSION = 0.01


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    accuracy: float
    """The new version's held-out accuracy."""
    baseline_version: str | None
    """The version promoted when this one was scored; None if there was none."""
    baseline_accuracy: float | None
    """That version's accuracy on the same held-out rows."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(accuracy: float, baseline_version: str | None, baseline_accuracy: float | None, *,
           min_accuracy: float, max_regression: float,
           baseline_problem: str | None = None) -> Decision:
    """Promote when ``accuracy`` is at least ``min_accuracy`` and at most ``max_regression``
    below the promoted version's accuracy on the same rows (when it could be scored:
    ``baseline_problem`` says why not)."""
    def decision(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, accuracy, baseline_version, baseline_accuracy)

    if accuracy < min_accuracy:
        return decision(False, f"held-out accuracy {accuracy:.4f} is below min_accuracy "
                               f"{min_accuracy:g}")
    if baseline_problem:
        # Fail closed: a promoted version made unreadable must not open the gate.
        return decision(False, f"the promoted version {baseline_version} could not be scored "
                               f"on the same rows ({baseline_problem}); promote this version "
                               "by hand if it should replace it")
    if baseline_accuracy is None:
        return decision(True, f"held-out accuracy {accuracy:.4f} >= min_accuracy "
                              f"{min_accuracy:g}; no version was promoted before")
    drop = baseline_accuracy - accuracy
    if drop > max_regression:
        return decision(False, f"held-out accuracy {accuracy:.4f} is {drop:.4f} below the "
                               f"promoted version {baseline_version} on the same rows "
                               f"({baseline_accuracy:.4f}); max_regression is {max_regression:g}")
    return decision(True, f"held-out accuracy {accuracy:.4f} >= min_accuracy {min_accuracy:g}, "
                          f"and not more than {max_regression:g} below the promoted version "
                          f"{baseline_version} on the same rows ({baseline_accuracy:.4f})")
