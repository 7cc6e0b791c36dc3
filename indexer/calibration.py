"""An index's calibration: the search setting measured to beat the global baseline, kept beside it.

``vit-rerank index calibrate`` writes ``DIR/calibration.json`` atomically. The searcher, the CLI and
the service use its setting unless a request overrides it; ``index info`` and ``GET /index`` show it.
A calibration that found no setting above noise stores ``rerank: false`` (plain global search).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json

CALIBRATION_NAME = "calibration.json"


@dataclass
class Calibration:
    """The chosen setting and the evidence for it.

    Attributes:
        rerank: False when no setting beat the baseline above noise: search without reranking.
        scorer, threshold, marginals, s, lam, rerank_k: the chosen setting (meaningful when ``rerank``).
        metric: the primary metric the choice maximised (``map_at_r``, ``recall_at_1``, ...).
        baseline_heldout, calibrated_heldout: that metric on the held-out queries.
        gain_heldout, gain_ci95: held-out gain over the baseline and its paired-bootstrap 95 % interval.
        tuning_queries, heldout_queries, seed: how the queries were split.
        source: what the labelled queries were (a folder, a pairs set, or the index's own labels).
    """

    rerank: bool
    marginals: str
    s: float
    lam: float
    rerank_k: int
    metric: str
    baseline_heldout: float
    calibrated_heldout: float
    gain_heldout: float
    gain_ci95: tuple[float, float]
    tuning_queries: int
    heldout_queries: int
    seed: int
    source: str
    candidates_tried: int = 0
    candidates_above_noise: int = 0
    created_at: str = ""
    scorer: str = "ot"  # files written before the mnn scorer existed chose among OT settings
    threshold: float | None = None  # mnn's cosine threshold (None for ot)
    details: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / CALIBRATION_NAME, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "Calibration | None":
        """The calibration stored in ``folder``, or None when it has none."""
        path = Path(folder) / CALIBRATION_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        data["gain_ci95"] = tuple(data.get("gain_ci95", (0.0, 0.0)))
        return cls(**{k: v for k, v in data.items() if k in known})

    def setting(self) -> dict[str, Any]:
        """The search parameters it sets (``rerank_k = 0`` when reranking does not pay)."""
        out = {"scorer": self.scorer, "marginals": self.marginals, "s": self.s, "lam": self.lam,
               "rerank_k": self.rerank_k if self.rerank else 0}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def summary(self) -> dict[str, Any]:
        """What ``index info`` and ``GET /index`` show."""
        lo, hi = self.gain_ci95
        return {
            "rerank": self.rerank, **self.setting(), "metric": self.metric,
            "baseline_heldout": self.baseline_heldout, "calibrated_heldout": self.calibrated_heldout,
            "gain_heldout": self.gain_heldout, "gain_ci95": [lo, hi],
            "queries": {"tuning": self.tuning_queries, "heldout": self.heldout_queries},
            "source": self.source, "created_at": self.created_at,
        }
