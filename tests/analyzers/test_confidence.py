"""Finding confidence: one formula of sample size and effect size."""

import pytest

from servescope.analyzers.findings import Finding, confidence, confidence_level


def test_confidence_grows_with_samples_and_with_effect():
    assert confidence(10, 3.0) < confidence(100, 3.0) < confidence(10_000, 3.0) < 1
    assert confidence(100, 1.2) < confidence(100, 2.0) < confidence(100, 8.0) < 1
    assert confidence(0, 5.0) == 0 and confidence(500, 1.0) == 0 and confidence(500, 0.5) == 0
    assert confidence(None, 2.0) is None and confidence(30, float("nan")) is None


def test_levels_and_the_finding_carries_it():
    assert [confidence_level(c) for c in (0.9, 0.5, 0.1, None)] == ["high", "medium", "low", None]
    f = Finding(rule="convoy", severity="high", title="t", summary="s", evidence={"n": 30, "effect": 2.0})
    assert f.confidence == pytest.approx(0.5)
    assert f.to_dict()["confidence"] == 0.5 and f.to_dict()["confidence_level"] == "medium"
