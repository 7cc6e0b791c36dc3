"""Hugging Face CvT (``microsoft/cvt-13``): the normed stage-3 CLS token is global; stage-3 tokens are the grid."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .base import DEFAULT_GRID, AttentionGrid, AttentionObserver, Backbone, BackboneOutput, pool_tokens
from .registry import register_backbone
from .weights import check_weights_arg, read_state_dict, seeded_if_random, weights_identity, weights_unavailable

INSTALL_HINT = "pip install 'vit-rerank[cvt]'"

#: CvT-13's published preprocessing (microsoft/cvt-13 preprocessor_config.json), used when it cannot be read.
CVT_PREPROCESSING: dict[str, Any] = {
    "size": 224,
    "crop_pct": 0.875,
    "resample": 3,  # PIL bicubic
    "image_mean": (0.485, 0.456, 0.406),
    "image_std": (0.229, 0.224, 0.225),
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def cvt_data_config(preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm ``create_transform`` arguments equivalent to HF's CvT (ConvNext) image processor."""
    cfg = {**CVT_PREPROCESSING, **(preprocessing or {})}
    size = cfg["size"]
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size["height"]
    size = int(size)
    if size < 384:  # HF: resize the short side to size / crop_pct, then centre-crop size x size
        crop = dict(crop_pct=float(cfg["crop_pct"] or CVT_PREPROCESSING["crop_pct"]), crop_mode="center")
    else:  # HF: warp straight to size x size
        crop = dict(crop_pct=1.0, crop_mode="squash")
    return dict(
        input_size=(3, size, size),
        interpolation=_RESAMPLE.get(cfg["resample"], "bicubic"),
        mean=tuple(cfg["image_mean"]),
        std=tuple(cfg["image_std"]),
        **crop,
    )


class _ObservedBlock:
    """Hooks of one self-attention block: its query and key grids, then its attention, handed on."""

    def __init__(self, num_prefix_tokens: int, observe: AttentionObserver) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.observe = observe
        self.query_grid: tuple[int, int] | None = None
        self.key_grid: tuple[int, int] | None = None
        self.seen = False

    def on_query(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        self.query_grid = (int(out.shape[-2]), int(out.shape[-1]))  # (B, C, h, w) of the query conv

    def on_key(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        self.key_grid = (int(out.shape[-2]), int(out.shape[-1]))  # (B, C, h/s, w/s) of the key conv

    def on_attention(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        # attention dropout's output: the softmax itself in eval mode; q and k ran before it
        if self.query_grid is None or self.key_grid is None:
            raise RuntimeError("a CvT self-attention block ran its attention before its projections")
        self.seen = True
        self.observe(out, AttentionGrid(self.query_grid, self.key_grid, self.num_prefix_tokens))


class HfCvt(Backbone):
    """A ``CvtForImageClassification`` minus its head: the final LayerNorm of the stage-3 CLS token
    is global; the stage-3 tokens (14 x 14 at 224), through the same LayerNorm, pool to G x G.

    Attention rollout chains over *all* self-attention blocks of all stages, in forward order
    (docs/method.md: the blocks are chained in order): CvT-13 at 224 px has 1 block with 56 x 56
    queries and 28 x 28 keys, 2 blocks with 28 x 28 / 14 x 14, then 10 blocks with a CLS token and
    14 x 14 / 7 x 7. Each block is pooled from its own query and key grids to G x G, so the chain is
    well defined across stages; the convolutional token embedding between stages is local (a few
    pixels of the coarser grid) and taken as the identity at G x G, as the residual path is within
    a stage. Only stage 3 has a prefix (CLS) token. The CLS-row rollout is undefined (strided keys).
    """

    supports_rollout = True

    def __init__(
        self,
        model: nn.Module,
        name: str,
        weights_id: str,
        grid: int = DEFAULT_GRID,
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name, weights_id, grid)
        self.model = model.eval()
        self._use_preprocessing(cvt_data_config(preprocessing))

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim[-1])


    def _attention_modules(self) -> list[nn.Module]:
        """Every ``CvtSelfAttention``, stage by stage, block by block (the forward order)."""
        return [layer.attention.attention for stage in self.model.cvt.encoder.stages for layer in stage.layers]

    @contextmanager
    def _observe_attention(self, observe: AttentionObserver) -> Iterator[list[_ObservedBlock]]:
        """Hand each block's post-softmax attention and grids to ``observe``; hooks removed afterwards.

        HF's ``CvtSelfAttention`` applies ``self.dropout`` to the softmax output, and its
        depthwise-convolution query and key projections output ``(B, C, h, w)`` maps; forward
        hooks on those three modules read the query grid, the key grid and the attention.
        """
        modules = self._attention_modules()
        blocks: list[_ObservedBlock] = []
        hooks = []
        try:
            for m in modules:
                try:
                    query_conv = m.convolution_projection_query.convolution_projection
                    key_conv = m.convolution_projection_key.convolution_projection
                    dropout = m.dropout
                except AttributeError as err:
                    raise ValueError(
                        f"{self.name}: self-attention module {type(m).__name__} cannot be captured "
                        "(expected depthwise-convolution q/k projections and an attention dropout)"
                    ) from err
                block = _ObservedBlock(1 if m.with_cls_token else 0, observe)
                blocks.append(block)
                hooks.append(query_conv.register_forward_hook(block.on_query))
                hooks.append(key_conv.register_forward_hook(block.on_key))
                hooks.append(dropout.register_forward_hook(block.on_attention))
            yield blocks
        finally:
            for h in hooks:
                h.remove()

    def _features(self, images, observe):
        if observe is not None:
            with self._observe_attention(observe) as blocks:
                out = self.model.cvt(images, return_dict=True)
            if not all(b.seen for b in blocks):
                raise RuntimeError("a CvT self-attention block did not run during the forward pass")
        else:
            out = self.model.cvt(images, return_dict=True)
        _, _, h, w = out.last_hidden_state.shape  # (B, C, h, w)
        norm = self.model.layernorm
        tokens = norm(out.last_hidden_state.flatten(2).transpose(1, 2))  # (B, h*w, C)
        if out.cls_token_value is not None:
            global_vec, num_prefix = norm(out.cls_token_value)[:, 0], 1
        else:  # no stage-3 CLS token: mean of the normed tokens, as HF's classifier does
            global_vec, num_prefix = tokens.mean(dim=1), 0
        patches = pool_tokens(tokens, (h, w), self.grid)
        return BackboneOutput(global_vec, patches, (h, w), num_prefix)


def _check_keys(missing: Any, unexpected: Any, source: str) -> None:
    """Raise ValueError unless every backbone weight (head and BatchNorm counters aside) was loaded."""
    missing = sorted(k for k in missing if not k.startswith("classifier.") and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in unexpected if not k.startswith("classifier."))
    if missing or unexpected:
        raise ValueError(
            f"{source!r} does not match the CvT model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Expected a Hugging Face "
            "CvtForImageClassification checkpoint ('cvt.encoder.*' and the final 'layernorm.*') "
            "whose sizes match the config (pass model_kwargs for a non-CvT-13 state dict)."
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hub_preprocessing(repo: str) -> dict[str, Any] | None:
    """The repository's ``preprocessor_config.json`` (downloaded or cached), or None."""
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(repo, "preprocessor_config.json")))
    except Exception:  # offline, not cached, no such file: fall back to the CvT-13 defaults
        return None


def _load_state_dict_file(model: nn.Module, path: Path) -> None:
    """Load a single ``.safetensors`` / ``.bin`` / ``.pth`` state dict into ``model``, strictly."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    expected = model.state_dict()
    _check_keys(expected.keys() - state.keys(), state.keys() - expected.keys(), str(path))
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches
        raise ValueError(f"{str(path)!r} does not fit the CvT config: {err}") from err


def create_hf_cvt(
    name: str = "microsoft/cvt-13",
    weights: str = "pretrained",
    *,
    grid: int = DEFAULT_GRID,
    model_kwargs: dict[str, Any] | None = None,
) -> HfCvt:
    """Create a CvT backbone in eval mode on the CPU.

    Args:
        name: Hugging Face repository id, e.g. ``microsoft/cvt-13``.
        weights: ``"pretrained"`` (hub or local cache), a directory written by ``save_pretrained``,
            a single state-dict file (``.safetensors``/``.bin``/``.pth``) for the ``CvtConfig(**model_kwargs)``
            model (CvT-13 by default), or ``"random"``.
        grid: side ``G`` of the patch grid.
        model_kwargs: ``CvtConfig`` fields (overrides for ``from_pretrained``).

    Raises:
        ImportError: transformers is not installed.
        FileNotFoundError: a weights path that does not exist.
        ValueError: a local checkpoint that does not match the model.
        WeightsUnavailableError: pretrained weights cannot be downloaded or found.
    """
    try:
        from transformers import CvtConfig, CvtForImageClassification
    except ImportError as err:
        raise ImportError(f"{name} needs Hugging Face transformers: {INSTALL_HINT}") from err
    check_weights_arg(weights, allow_dir=True)
    kwargs = dict(model_kwargs or {})
    preprocessing = None
    if weights == "random":
        with seeded_if_random(weights):
            model = CvtForImageClassification(CvtConfig(**kwargs))
    elif weights == "pretrained" or Path(weights).is_dir():
        source = name if weights == "pretrained" else weights
        try:
            model, info = CvtForImageClassification.from_pretrained(source, output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as err:
            if weights == "pretrained":
                raise weights_unavailable(name, err) from err
            raise ValueError(f"could not load the CvT model saved in {weights!r}: {err}") from err
        _check_keys(info["missing_keys"], info["unexpected_keys"], source)
        if weights == "pretrained":
            preprocessing = _hub_preprocessing(name)
        else:
            preprocessing = _read_json(Path(weights) / "preprocessor_config.json")
    else:
        model = CvtForImageClassification(CvtConfig(**kwargs))
        _load_state_dict_file(model, Path(weights))
    return HfCvt(model, name, weights_identity(weights), grid, preprocessing)


#: Names served by the CvT kind (needs the ``cvt`` extra); ``hf:`` may prefix the repository id.
HF_CVT_PREFIXES = ("microsoft/cvt", "hf:microsoft/cvt")


@register_backbone(
    "hf-cvt",
    serves=lambda name: name.startswith(HF_CVT_PREFIXES),
    accepts_weights_dir=True,
    examples=("microsoft/cvt-13",),
)
def _create_registered(name: str, weights: str, grid: int, model_kwargs: dict[str, Any]) -> Backbone:
    backbone = create_hf_cvt(name.removeprefix("hf:"), weights, grid=grid, model_kwargs=model_kwargs)
    backbone.weights_source = weights
    return backbone
