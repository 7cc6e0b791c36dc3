"""The metric-learning losses on offer, all from pytorch-metric-learning.

Proxy-based losses (proxy-anchor, ArcFace) have parameters of their own (one proxy per class),
trained with a larger learning rate as their authors do."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: ``--loss`` choices; the default was chosen by measurement (docs/training.md).
LOSS_NAMES = ("multi-similarity", "triplet", "proxy-anchor", "arcface")
DEFAULT_LOSS = "multi-similarity"
#: Learning-rate factor of a loss's own parameters (proxies) over the model's.
PROXY_LR_FACTOR = 100.0


@dataclass
class MetricLoss:
    """A loss and its miner (None: every pair/triplet of the batch)."""

    loss: nn.Module
    miner: nn.Module | None

    def __call__(self, embeddings, labels):
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)


def make_loss(name: str, num_classes: int, embedding_size: int) -> MetricLoss:
    from pytorch_metric_learning import losses, miners

    if name == "multi-similarity":
        return MetricLoss(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                          miners.MultiSimilarityMiner(epsilon=0.1))
    if name == "triplet":
        return MetricLoss(losses.TripletMarginLoss(margin=0.1),
                          miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"))
    if name == "proxy-anchor":
        return MetricLoss(losses.ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32), None)
    if name == "arcface":
        return MetricLoss(losses.ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64), None)
    raise ValueError(f"unknown --loss {name!r}: use one of {', '.join(LOSS_NAMES)}")
