"""A diagnosis finding: what a rule concluded, with the figures behind it.

findings.json is the list of `Finding.to_dict()` (DESIGN.md); the report
renders the same objects plus their chart. Ranking is by severity, then by the
rule's order in the registry `analyzers.rules.RULES`, the one list of rule ids
(a stable order, so two reports of one run list findings identically).

Every finding carries a confidence in [0, 1] (and its level, high / medium /
low), computed by `confidence` alone from two figures each rule puts in its
evidence: `n`, the sample size the conclusion rests on (the smaller of the
groups compared), and `effect`, how many times the rule's signal exceeds its
no-effect value (1: no effect).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SEVERITIES = ("high", "medium", "low", "info")
CONFIDENCE_HALF_N = 30  # samples at which the sample-size factor reaches one half
CONFIDENCE_LEVELS = ((0.7, "high"), (0.4, "medium"), (0.0, "low"))


def confidence(n: float | None, effect: float | None) -> float | None:
    """How far a finding can be trusted, in [0, 1], from its sample size and effect size.

    The product of two factors in [0, 1), one per way a finding can mislead:
    too few samples (`n / (n + CONFIDENCE_HALF_N)`: half at 30, 0.97 at 1,000)
    and too small an effect (`1 - 1 / effect`: 0 at no effect, half at 2x,
    0.75 at 4x), under a square root so that either one alone can hold the
    confidence down but neither needs to be perfect. It grows strictly with
    both. None when a figure is unknown (not NaN, so findings.json stays JSON).
    """
    if n is None or effect is None or not np.isfinite(n) or not np.isfinite(effect):
        return None
    samples = max(float(n), 0.0) / (max(float(n), 0.0) + CONFIDENCE_HALF_N)
    size = 1.0 - 1.0 / max(float(effect), 1.0)
    return float(np.sqrt(samples * size))


def confidence_level(value: float | None) -> str | None:
    """high (>= 0.7), medium (>= 0.4) or low; None when the confidence is unknown."""
    if value is None:
        return None
    return next(level for bound, level in CONFIDENCE_LEVELS if value >= bound)


def demote(severity: str) -> str:
    """One severity level lower; info stays info."""
    return SEVERITIES[min(SEVERITIES.index(severity) + 1, len(SEVERITIES) - 1)]


@dataclass
class Finding:
    """One conclusion of one rule. `evidence` holds plain numbers (JSON-ready), `chart` a plotly figure dict."""

    rule: str
    severity: str
    title: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)
    suggestion: str = ""
    chart: dict[str, Any] | None = None
    uncertain: bool = False  # set when the load generator itself was the bottleneck
    confidence: float | None = None  # from evidence `n` and `effect` when not given (see `confidence`)
    # request_id of the requests this cause slowed, for judging competing causes; never in findings.json
    _affected: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        if not self.title or not self.summary:
            raise ValueError(f"finding {self.rule}: title and summary are required")
        if self.confidence is None:
            self.confidence = confidence(self.evidence.get("n"), self.evidence.get("effect"))

    @property
    def confidence_level(self) -> str | None:
        return confidence_level(self.confidence)

    def to_dict(self) -> dict[str, Any]:
        """The findings.json entry (the chart stays in the report)."""
        return {
            "rule": self.rule,
            "severity": self.severity,
            "title": self.title,
            "summary": self.summary,
            "evidence": self.evidence,
            "slices": self.slices,
            "suggestion": self.suggestion,
            "uncertain": self.uncertain,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
            "confidence_level": self.confidence_level,
        }


def rank_findings(findings: list[Finding], rule_order: Sequence[str]) -> list[Finding]:
    """Most severe first; among equals, in `rule_order` (the registry's order)."""
    position = {rule: i for i, rule in enumerate(rule_order)}
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), position.get(f.rule, len(position))))
