"""Plain metric functions on (correct, confidence) lists: no classes, no state.

- `average_precision`: sklearn's `average_precision_score(correct, confidence)` (the R-Tuning AP);
  None when there is no correct item (AP is undefined then).
- `expected_calibration_error`: equal-width bins over [0, 1] (10 by default; the last bin holds
  1.0), the bins' |accuracy - mean confidence| weighted by their share of the items.
- `reliability_bins`: the per-bin numbers behind ECE (for a reliability diagram).
- `auroc`, `brier`: the usual ones; `auroc` is None when only one class is present.
"""

from __future__ import annotations

from typing import Sequence

from pipeline.report import figure


def _pair(correct: Sequence, confidence: Sequence) -> tuple[list[float], list[float]]:
    y = [float(bool(c)) for c in correct]
    p = [float(c) for c in confidence]
    if len(y) != len(p):
        raise ValueError(f"correct has {len(y)} items but confidence has {len(p)}")
    if any(not 0.0 <= c <= 1.0 for c in p):
        raise ValueError("confidence values must lie in [0, 1]")
    return y, p


def reliability_bins(correct: Sequence, confidence: Sequence, n_bins: int = 10) -> list[dict]:
    """One dict per equal-width bin: lo, hi, count, accuracy, confidence (means; None when empty)."""
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    y, p = _pair(correct, confidence)
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, c in enumerate(p):
        members[min(int(c * n_bins), n_bins - 1)].append(i)  # c == 1.0 goes to the last bin
    out = []
    for b, idx in enumerate(members):
        out.append({
            "lo": b / n_bins, "hi": (b + 1) / n_bins, "count": len(idx),
            "accuracy": sum(y[i] for i in idx) / len(idx) if idx else None,
            "confidence": sum(p[i] for i in idx) / len(idx) if idx else None,
        })
    return out


def expected_calibration_error(correct: Sequence, confidence: Sequence, n_bins: int = 10) -> float:
    """ECE with `n_bins` equal-width bins on binary correctness; 0.0 for no items."""
    bins = reliability_bins(correct, confidence, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def average_precision(correct: Sequence, confidence: Sequence) -> float | None:
    y, p = _pair(correct, confidence)
    if not any(y):
        return None
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p))


def auroc(correct: Sequence, confidence: Sequence) -> float | None:
    y, p = _pair(correct, confidence)
    if len(set(y)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def brier(correct: Sequence, confidence: Sequence) -> float | None:
    y, p = _pair(correct, confidence)
    if not y:
        return None
    return sum((c - t) ** 2 for t, c in zip(y, p)) / len(y)


def reliability_diagram(bins: dict[str, list[dict]], out, title: str = "") -> None:
    """PNG: per named bin list (say a split each), accuracy against mean confidence, and the diagonal."""
    with figure(out, figsize=(5, 5)) as (_, ax):
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        for name, rows in bins.items():
            pts = [(b["confidence"], b["accuracy"]) for b in rows if b["count"]]
            if pts:
                ax.plot(*zip(*pts), "o-", label=name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean confidence in bin")
        ax.set_ylabel("accuracy in bin")
        ax.set_title(title)
        ax.legend(loc="upper left")
