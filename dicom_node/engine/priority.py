"""Worklist priority of a study from its findings: the class, a reason a radiologist can read, a score.

Contract: `decide_priority(findings, rules)` maps one job's outcome to a `PriorityDecision`
(`priority`, `reason`, `score`) under the `[priority]` rules of the config
(`dicom_node.config.PriorityConfig`, explained in docs/worklist.md "Priority rules"):

- `critical`: PE present and any of `critical_labels` called present (default: central PE or
  RV/LV ratio >= 1, the findings that change treatment now);
- `urgent`: PE present otherwise;
- `check`: no PE called, and the exam is indeterminate (`indeterminate_is_check`) or the
  analysis failed (`failed_is_check`): the model cannot vouch for it, so a person must look soon;
- `routine`: everything else.

"PE present" is the model's own consistent call (`Prediction.positive`, at the bundle's threshold)
or, when `pe_min_probability` > 0, a highest window PE probability at or above it.

Reading order (`READING_ORDER`, `Priority.rank`): critical, urgent, check, routine. `check` ranks
above `routine` because an unreadable or failed analysis may hide a PE that the model would have
flagged; it ranks below `urgent` because a flagged PE is the likelier emergency. Within a class,
the higher `score` is read first (the highest window PE probability, 0-1; 0 for a failed
analysis), then the earlier arrival (the worklist query, `State.worklist`).

The reason names findings by their clinical names (`dicom_node.labels.DISPLAY_NAMES`) and never
holds patient identity, so it may be logged.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dicom_node.config import PRIORITY_VALUES, PriorityConfig
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL, display_name

if TYPE_CHECKING:
    from dicom_node.model.inference import Prediction

__all__ = ["Priority", "PriorityDecision", "Findings", "READING_ORDER", "decide_priority"]


class Priority(enum.Enum):
    """Worklist priority classes; `rank` 0 is read first."""

    CRITICAL = "critical"
    URGENT = "urgent"
    CHECK = "check"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """Position in the reading order (0 = first)."""
        return READING_ORDER.index(self)

    @property
    def hl7_code(self) -> str:
        """HL7 v2 priority (OBR-5 / table 0027): S = stat, A = as soon as possible, R = routine."""
        return {"critical": "S", "urgent": "A", "check": "A", "routine": "R"}[self.value]


#: the reading order of the worklist: critical, urgent, check, routine
READING_ORDER: tuple[Priority, ...] = (Priority.CRITICAL, Priority.URGENT, Priority.CHECK, Priority.ROUTINE)
if tuple(p.value for p in READING_ORDER) != PRIORITY_VALUES:  # the config validates against the same names
    raise RuntimeError(f"READING_ORDER {READING_ORDER} and config PRIORITY_VALUES {PRIORITY_VALUES} disagree")


@dataclass(frozen=True)
class Findings:
    """What the model said about one series, as the priority rules and notifications need it.

    `pe_probability`: highest window PE probability (0-1); `positive`: the model's consistent PE
    call; `labels`: study label -> called present; `probabilities`: label -> probability
    (WINDOW_LABEL and the study labels)."""

    pe_probability: float
    positive: bool
    labels: Mapping[str, bool] = field(default_factory=dict)
    probabilities: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_prediction(cls, prediction: Prediction) -> Findings:
        probs = prediction.label_probabilities()
        return cls(pe_probability=float(probs[WINDOW_LABEL]), positive=prediction.positive,
                   labels={k: bool(prediction.labels.get(k, False)) for k in STUDY_LABELS},
                   probabilities={k: round(float(v), 4) for k, v in probs.items()})

    def present(self) -> list[str]:
        """Study labels called present, in STUDY_LABELS order."""
        return [k for k in STUDY_LABELS if self.labels.get(k)]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (notifications, the worklist API)."""
        return {"pe_probability": round(self.pe_probability, 4), "pe_present": self.positive,
                "present": self.present(), "probabilities": dict(self.probabilities)}


@dataclass(frozen=True)
class PriorityDecision:
    """A study's worklist priority, why (a readable sentence without patient identity), and the
    score that orders studies within the class (higher first)."""

    priority: Priority
    reason: str
    score: float


#: the `[priority]` rules of a node with the default configuration
_DEFAULT_RULES = PriorityConfig()


def decide_priority(findings: Findings | None, rules: PriorityConfig = _DEFAULT_RULES, *,
                    error: str | None = None) -> PriorityDecision:
    """The priority of one job: from its `findings`; without findings (the analysis failed with `error`, or
    the job body reported none) `check` (or `routine` when `failed_is_check` is false)."""
    if findings is None:
        what = f"analysis failed ({error.split(':', 1)[0]})" if error else "no findings from the model"
        if rules.failed_is_check:
            return PriorityDecision(Priority.CHECK, f"{what}: read without AI triage", 0.0)
        return PriorityDecision(Priority.ROUTINE, what, 0.0)
    p = round(float(findings.pe_probability), 4)
    by_threshold = 0.0 < rules.pe_min_probability <= p
    if findings.positive or by_threshold:
        basis = f"PE suspected (probability {p:.2f}" + (")" if findings.positive else
                                                        f" >= triage threshold {rules.pe_min_probability:.2f})")
        critical = [display_name(k) for k in rules.critical_labels if findings.labels.get(k)]
        if critical:
            return PriorityDecision(Priority.CRITICAL, f"{basis}: {', '.join(critical)}", p)
        return PriorityDecision(Priority.URGENT, basis, p)
    if findings.labels.get("indeterminate") and rules.indeterminate_is_check:
        return PriorityDecision(Priority.CHECK, f"{display_name('indeterminate')} (PE probability {p:.2f})", p)
    return PriorityDecision(Priority.ROUTINE, f"no PE found (probability {p:.2f})", p)
