"""timm backbones: plain ViTs (DeiT, DINO, ViT-S/B ...) and Swin transformers."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from .base import DEFAULT_GRID, AttentionGrid, AttentionObserver, Backbone, BackboneOutput, pool_tokens


def model_data_config(model: nn.Module) -> dict:
    """timm's data config for ``model`` as built, not as its name's default.

    ``resolve_model_data_config`` reads the pretrained config, whose input size is the
    checkpoint's (518 px for DINOv2) even when the model was built with another
    ``img_size``; the size the model really takes wins here, and the crop fraction,
    interpolation and mean/std stay the pretrained config's.
    """
    cfg = dict(resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (3, int(img_size[0]), int(img_size[1]))
    return cfg


class TimmBackbone(Backbone):
    """Common part of the timm wrappers: the model, its preprocessing and its width."""

    def __init__(self, model: nn.Module, name: str, weights_id: str, grid: int = DEFAULT_GRID) -> None:
        super().__init__(name, weights_id, grid)
        self.model = model.eval()
        self._use_preprocessing(model_data_config(model))

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_features)



class TimmViT(TimmBackbone):
    """A plain timm ViT: the CLS token (or the model's own pooling) is global; patch tokens pool to G x G."""

    supports_rollout = True
    square_attention = True
    supports_patch_layer = True
    supports_onnx = True

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def native_grid(self) -> int:
        return int(self.model.patch_embed.grid_size[0])

    @contextmanager
    def _capture_block(self) -> Iterator[list[torch.Tensor]]:
        """The output of block :attr:`patch_layer` (before the final norm), caught while the forward runs."""
        caught: list[torch.Tensor] = []
        hook = self.model.blocks[self.patch_layer].register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            yield caught
        finally:
            hook.remove()

    def _attention_modules(self) -> list[nn.Module]:
        return [blk.attn for blk in self.model.blocks]

    @contextmanager
    def _observe_attention(self, observe: AttentionObserver, layout: AttentionGrid) -> Iterator[None]:
        """Hand each block's post-softmax attention to ``observe`` as it is computed.

        Fused attention never materialises the matrix, so it is switched off on this
        model's attention modules for the duration and restored after; other models
        and timm's global setting are untouched. When ``observe.last_block_only`` is set
        (``last_cls`` weights), only the last block is captured and the others stay fused.
        Nothing keeps the maps: each block's is freed once its forward is done, unless
        ``observe`` keeps it.
        """
        modules = self._attention_modules()
        if getattr(observe, "last_block_only", False):
            modules = modules[-1:]
        for m in modules:
            if not hasattr(m, "fused_attn") or not hasattr(m, "attn_drop"):
                raise ValueError(f"{self.name}: attention module {type(m).__name__} cannot be captured")
        saved = [m.fused_attn for m in modules]
        hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, out: observe(out, layout)) for m in modules]
        try:
            for m in modules:
                m.fused_attn = False
            yield
        finally:
            for m, fused in zip(modules, saved):
                m.fused_attn = fused
            for h in hooks:
                h.remove()

    def torch_tokens(self, images: torch.Tensor, observe: AttentionObserver | None = None,
                     layout: AttentionGrid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The final tokens ``(B, T, D)`` and the patch layer's ``(B, T, D)`` (the final ones when it is None) of
        a torch forward, handing each block's attention (``layout``) to ``observe`` when given. The ``onnx``
        runtime exports this very function."""
        with ExitStack() as stack:
            if observe is not None:
                stack.enter_context(self._observe_attention(observe, layout))
            caught = stack.enter_context(self._capture_block()) if self.patch_layer is not None else None
            tokens = self.model.forward_features(images)
        return tokens, tokens if caught is None else caught[0]

    def _features(self, images, observe):
        model = self.model
        token_grid = tuple(model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        num_prefix = int(model.num_prefix_tokens)
        onnx = self.onnx_forward
        if observe is None and onnx is not None and onnx.layer == self.patch_layer and onnx.accepts(images):
            tokens, grid_tokens = onnx(images)  # the onnx runtime (reranker.backbones.onnx_runtime)
        else:
            tokens, grid_tokens = self.torch_tokens(images, observe, AttentionGrid(token_grid, token_grid, num_prefix))
        global_vec = model.forward_head(tokens, pre_logits=True)
        patches = pool_tokens(grid_tokens[:, num_prefix:], token_grid, self.grid)
        return BackboneOutput(global_vec, patches, token_grid, num_prefix)


class TimmSwin(TimmBackbone):
    """A timm Swin transformer: average-pooled final tokens are global; the final 7x7 tokens are the grid."""

    supports_rollout = False  # windowed attention has no global rollout

    def _features(self, images, observe):
        tokens = self.model.forward_features(images)  # (B, h, w, C), after the final norm
        B, h, w, C = tokens.shape
        global_vec = self.model.forward_head(tokens, pre_logits=True)
        patches = pool_tokens(tokens.reshape(B, h * w, C), (h, w), self.grid)
        return BackboneOutput(global_vec, patches, (h, w), 0)


def is_plain_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def is_swin(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def create_timm_model(name: str, pretrained: bool, weights_file: str | None, **kwargs) -> nn.Module:
    """Create a timm model, optionally with weights from a local file (original checkpoints too).

    A ``pretrained_cfg_overlay`` among ``kwargs`` (e.g. another ``crop_pct``) is merged with the file's.
    """
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if weights_file is not None:
        overlay["file"] = weights_file
        pretrained = True
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(name, pretrained=pretrained, **kwargs)
