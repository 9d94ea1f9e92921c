"""A diagnosis finding: what a rule concluded, with the figures behind it.

findings.json is the list of `Finding.to_dict()` (DESIGN.md); the report
renders the same objects plus their chart. Ranking is by severity, then by the
rule's order in the registry `analyzers.rules.RULES`, the one list of rule ids
(a stable order, so two reports of one run list findings identically).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("high", "medium", "low", "info")


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

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        if not self.title or not self.summary:
            raise ValueError(f"finding {self.rule}: title and summary are required")

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
        }


def rank_findings(findings: list[Finding], rule_order: Sequence[str]) -> list[Finding]:
    """Most severe first; among equals, in `rule_order` (the registry's order)."""
    position = {rule: i for i, rule in enumerate(rule_order)}
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), position.get(f.rule, len(position))))
