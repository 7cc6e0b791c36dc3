"""Held-out retrieval figures: leave-one-out P@1 and MAP@R among the held-out images, by the
evaluation's own metrics (:mod:`evaluation.metrics`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.metrics import class_metrics, class_r


def leave_one_out_metrics(embeddings: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """``(N, D)`` embeddings of labelled images -> P@1, R-Precision, MAP@R by cosine, the query left out."""
    x = F.normalize(embeddings.float(), dim=1)
    sim = x @ x.T  # (N, N)
    sim.fill_diagonal_(-float("inf"))
    order = torch.argsort(sim, dim=1, descending=True)[:, :-1].numpy()  # (N, N-1): the query itself is last
    relevant = labels[order] == labels[:, None]
    return class_metrics(relevant, class_r(labels))
