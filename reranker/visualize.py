"""Render optimal-transport patch matches between a query and a candidate image.

The picture shows the query (left) and the candidate (right) side by side, each
with its ``grid x grid`` patch grid drawn faintly on top, optional heat maps of
the per-patch weights, and lines joining the centres of the patch pairs that
carry the most mass in the transport plan.

Patches are indexed row-major: patch ``p`` sits at row ``p // grid`` and column
``p % grid``.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["render_match"]

_GAP = 16  # px between the two panels
_TITLE_HEIGHT = 20  # px of the title strip, when a title is given
_BACKGROUND = (255, 255, 255)
_TITLE_COLOR = (0, 0, 0)
_GRID_COLOR = (255, 255, 255, 70)
_LINE_CMAP = "viridis"
_HEAT_CMAP = "inferno"
_HEAT_ALPHA = 0.45
_MIN_LINE_WIDTH = 1
_MAX_LINE_WIDTH = 4
_PX_PER_CELL = 4  # smallest patch cell, in px, that still makes a readable picture


def _to_numpy(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """Convert a tensor (any device/dtype) or array-like to a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from e


def _check_values(x: np.ndarray, name: str) -> None:
    """Reject non-finite or negative entries."""
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (x < 0).any():
        raise ValueError(f"{name} contains negative entries (min {x.min():.3g})")


def _prepare_plan(plan: torch.Tensor | np.ndarray, grid: int) -> np.ndarray:
    plan = _to_numpy(plan, "plan")
    n = grid * grid
    if plan.ndim != 2 or plan.shape != (n, n):
        raise ValueError(
            f"plan must have shape ({n}, {n}) for grid={grid}, got {tuple(plan.shape)}"
        )
    _check_values(plan, "plan")
    return plan


def _prepare_weights(
    weights: torch.Tensor | np.ndarray | None, grid: int, name: str
) -> np.ndarray | None:
    if weights is None:
        return None
    weights = _to_numpy(weights, name)
    n = grid * grid
    if weights.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) for grid={grid}, got {tuple(weights.shape)}"
        )
    _check_values(weights, name)
    return weights


def _to_rgb(image: Image.Image, size: int, name: str) -> Image.Image:
    """Any mode to RGB (transparency flattened onto white), resized to a square."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND + (255,)), rgba)
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def _cell_edges(grid: int, size: int) -> np.ndarray:
    """Pixel boundaries of the ``grid`` cells along one side of a ``size`` panel."""
    return np.round(np.arange(grid + 1) * size / grid).astype(int)


def _patch_centres(grid: int, size: int) -> np.ndarray:
    """(grid*grid, 2) array of patch centres (x, y) within a panel, row-major."""
    edges = _cell_edges(grid, size)
    mid = (edges[:-1] + edges[1:]) / 2.0
    ys, xs = np.meshgrid(mid, mid, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _rgba(cmap: matplotlib.colors.Colormap, value: float, alpha: float = 1.0) -> tuple[int, ...]:
    r, g, b, _ = cmap(float(value))
    return (round(r * 255), round(g * 255), round(b * 255), round(alpha * 255))


def _top_entries(plan: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest positive entries of ``plan`` as (i, j, mass), strongest first."""
    flat = plan.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    order = order[flat[order] > 0]
    n = plan.shape[1]
    return [(int(p // n), int(p % n), float(flat[p])) for p in order]


def _draw_heat(
    draw: ImageDraw.ImageDraw, weights: np.ndarray, grid: int, size: int, origin: tuple[int, int]
) -> None:
    top = weights.max()
    if top <= 0:
        return  # all-zero weights: nothing to tint
    cmap = matplotlib.colormaps[_HEAT_CMAP]
    edges = _cell_edges(grid, size)
    ox, oy = origin
    for p, w in enumerate(weights):
        r, c = divmod(p, grid)
        box = (ox + edges[c], oy + edges[r], ox + edges[c + 1] - 1, oy + edges[r + 1] - 1)
        draw.rectangle(box, fill=_rgba(cmap, w / top, _HEAT_ALPHA))


def _draw_grid(draw: ImageDraw.ImageDraw, grid: int, size: int, origin: tuple[int, int]) -> None:
    ox, oy = origin
    for e in _cell_edges(grid, size)[1:-1]:
        draw.line([(ox + e, oy), (ox + e, oy + size - 1)], fill=_GRID_COLOR, width=1)
        draw.line([(ox, oy + e), (ox + size - 1, oy + e)], fill=_GRID_COLOR, width=1)


def _draw_matches(
    draw: ImageDraw.ImageDraw,
    matches: list[tuple[int, int, float]],
    centres: np.ndarray,
    query_origin: tuple[int, int],
    candidate_origin: tuple[int, int],
) -> None:
    if not matches:
        return
    cmap = matplotlib.colormaps[_LINE_CMAP]
    top = matches[0][2]
    for i, j, mass in reversed(matches):  # weakest first so the strongest end up on top
        rel = mass / top
        width = round(_MIN_LINE_WIDTH + (_MAX_LINE_WIDTH - _MIN_LINE_WIDTH) * rel)
        color = _rgba(cmap, rel)
        x0, y0 = query_origin[0] + centres[i, 0], query_origin[1] + centres[i, 1]
        x1, y1 = candidate_origin[0] + centres[j, 0], candidate_origin[1] + centres[j, 1]
        draw.line([(x0, y0), (x1, y1)], fill=color, width=width)
        radius = width + 1
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)


def _fit_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, max_width: int
) -> str:
    """Shorten ``text`` with a trailing '...' until it fits in ``max_width`` px."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def _draw_title(canvas: Image.Image, title: str) -> None:
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    text = _fit_text(draw, title, font, canvas.width - 8)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (canvas.width - (right - left)) / 2 - left
    y = (_TITLE_HEIGHT - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill=_TITLE_COLOR, font=font)


def render_match(
    query_image: Image.Image,
    candidate_image: Image.Image,
    plan: torch.Tensor | np.ndarray,
    *,
    grid: int = 7,
    query_weights: torch.Tensor | np.ndarray | None = None,
    candidate_weights: torch.Tensor | np.ndarray | None = None,
    top_matches: int = 20,
    panel_size: int = 224,
    title: str | None = None,
) -> bytes:
    """Draw the strongest patch matches of a transport plan between two images.

    Each image is converted to RGB and resized to a ``panel_size`` square; the
    ``grid x grid`` patch cells are assumed to tile that square. For exact patch
    alignment pass the same (e.g. centre-cropped) view the model saw.

    Args:
        query_image: Query image, drawn on the left.
        candidate_image: Candidate image, drawn on the right.
        plan: ``(grid*grid, grid*grid)`` non-negative transport plan; ``plan[i, j]``
            is the mass moved from query patch ``i`` to candidate patch ``j``
            (row-major patch indices). An all-zero plan draws no lines.
        grid: Patches per side.
        query_weights: Optional ``(grid*grid,)`` non-negative query patch weights,
            overlaid as a heat map scaled by their maximum.
        candidate_weights: Same for the candidate.
        top_matches: Number of strongest plan entries drawn as lines; colour and
            width scale with mass relative to the strongest one drawn.
        panel_size: Side of each square panel in px.
        title: Optional text drawn in a strip above the panels.

    Returns:
        PNG bytes of an image ``2 * panel_size + 16`` px wide and ``panel_size``
        px high, plus a 20 px title strip on top when ``title`` is given.

    Raises:
        ValueError: On a plan or weights of the wrong shape, with NaN/inf or
            negative entries, ``top_matches < 1``, ``grid < 1`` or
            ``panel_size < 4 * grid``.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if top_matches < 1:
        raise ValueError(f"top_matches must be >= 1, got {top_matches}")
    if panel_size < _PX_PER_CELL * grid:
        raise ValueError(
            f"panel_size must be >= {_PX_PER_CELL * grid} for grid={grid}, got {panel_size}"
        )
    plan = _prepare_plan(plan, grid)
    query_weights = _prepare_weights(query_weights, grid, "query_weights")
    candidate_weights = _prepare_weights(candidate_weights, grid, "candidate_weights")

    top = _TITLE_HEIGHT if title is not None else 0
    query_origin = (0, top)
    candidate_origin = (panel_size + _GAP, top)
    canvas = Image.new("RGB", (2 * panel_size + _GAP, panel_size + top), _BACKGROUND)
    canvas.paste(_to_rgb(query_image, panel_size, "query_image"), query_origin)
    canvas.paste(_to_rgb(candidate_image, panel_size, "candidate_image"), candidate_origin)

    # Heat maps are blended with the photos; grid and lines go on a second layer.
    heat = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    heat_draw = ImageDraw.Draw(heat)
    for weights, origin in ((query_weights, query_origin), (candidate_weights, candidate_origin)):
        if weights is not None:
            _draw_heat(heat_draw, weights, grid, panel_size, origin)

    marks = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    marks_draw = ImageDraw.Draw(marks)
    for origin in (query_origin, candidate_origin):
        _draw_grid(marks_draw, grid, panel_size, origin)
    centres = _patch_centres(grid, panel_size)
    _draw_matches(marks_draw, _top_entries(plan, top_matches), centres, query_origin, candidate_origin)

    out = Image.alpha_composite(Image.alpha_composite(canvas.convert("RGBA"), heat), marks)
    out = out.convert("RGB")
    if title is not None:
        _draw_title(out, title)

    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
