"""The search parameters, declared once: defaults, bounds, help and the marginals enum.

The CLI's flags, the service's settings and form fields, the evaluation's sweeps and the
calibration's candidates all derive from :data:`SEARCH_PARAMS`. The defaults apply to an index
without a calibration. They were chosen by measurement with the real DINOv2 ViT-S/14 backbone (224 px,
256/224 crop, G = 7) on clothing-small *validation*, by a rule fixed beforehand: the best P@1 among the
settings (marginals x s x lambda at K = 100) that do not lower MAP@R, ties broken by MAP@R. That gives
cross-correlation, s = 0.5, lambda = 0.5: P@1 +0.29, MAP@R +0.07 on validation; confirmed on clothing-small
test (P@1 +0.00, MAP@R +0.29) and corridor (R@1 +1.80). Every difference is within a query or two of
noise: with this backbone reranking barely moves the primary metrics, and ``index calibrate`` (which
chooses "no rerank" on all three shared sets) is the way to know on a user's own data. The shipped
method default (rollout, s = 1, lambda = 1) lost 3.8 P@1 on validation and 9.9 R@1 on corridor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Marginals a search can ask for: ``auto`` (the calibration's, else the default), the index's stored
#: per-image weights (``rollout``), DIML's per-pair cross-correlation, or uniform.
MARGINALS_CHOICES: tuple[str, ...] = ("auto", "rollout", "crosscorr", "uniform")


@dataclass(frozen=True)
class SearchParam:
    """One search parameter: its type, default, bounds (inclusive unless ``gt``) and help."""

    name: str
    type: type
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any) -> None:
        """Raise ValueError when ``value`` is out of bounds (the message names the parameter)."""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
            return
        if isinstance(value, float) and value != value:  # NaN
            raise ValueError(f"{self.name} must be a number, got NaN")
        if self.ge is not None and value < self.ge:
            raise ValueError(f"{self.name} must be at least {self.ge:g}, got {value}")
        if self.gt is not None and value <= self.gt:
            raise ValueError(f"{self.name} must be greater than {self.gt:g}, got {value}")
        if self.le is not None and value > self.le:
            raise ValueError(f"{self.name} must be at most {self.le:g}, got {value}")

    def bounds(self) -> dict[str, Any]:
        """The bounds as pydantic ``Field``/FastAPI ``Form`` keyword arguments."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}


def _params(*params: SearchParam) -> dict[str, SearchParam]:
    return {p.name: p for p in params}


SEARCH_PARAMS: dict[str, SearchParam] = _params(
    SearchParam("top_k", int, 10, "results returned per query", ge=1, le=100),
    SearchParam("rerank_k", int, 100, "global candidates reranked by partial OT (0: no reranking)", ge=0, le=1000),
    SearchParam("s", float, 0.5, "fraction of patch mass matched by partial OT", gt=0.0, le=1.0),
    SearchParam("lam", float, 0.5, "weight of the structural score: final = cosine + lambda * sigma",
                ge=0.0, le=10.0),
    SearchParam("marginals", str, "auto", "patch weights: auto (the calibration's, else the default), "
                "rollout (the index's stored weights), crosscorr (per pair) or uniform",
                choices=MARGINALS_CHOICES),
    SearchParam("eps", float, 0.05, "entropic regularisation of the OT", gt=0.0, le=1.0),
)

#: What ``marginals=auto`` means for an index without a calibration (when the index allows it).
DEFAULT_MARGINALS = "crosscorr"


def default(name: str) -> Any:
    """The default of search parameter ``name``."""
    return SEARCH_PARAMS[name].default


#: Command-line flag of each parameter (``lam`` is ``--lambda``).
FLAGS = {"top_k": "--top-k", "rerank_k": "--rerank-k", "s": "--s", "lam": "--lambda", "marginals": "--marginals",
         "eps": "--eps"}


def add_search_arguments(parser: Any, names: tuple[str, ...] = tuple(SEARCH_PARAMS)) -> None:
    """Add ``--top-k``, ``--rerank-k``, ``--s``, ``--lambda``, ``--marginals``, ``--eps`` to an argparse
    parser; each defaults to None (the index's calibration, else the default the help names)."""
    for name in names:
        p = SEARCH_PARAMS[name]
        parser.add_argument(
            FLAGS[name], dest=name, type=p.type, default=None, choices=p.choices,
            help=f"{p.help} (default: the index's calibration, else {p.default})",
        )


def settings_from_args(args: Any) -> dict[str, Any]:
    """The search parameters an argparse namespace sets (None: unset)."""
    return {name: getattr(args, name, None) for name in SEARCH_PARAMS}
