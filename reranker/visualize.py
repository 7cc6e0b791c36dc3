"""Render optimal-transport patch matches between a query and a candidate image, for a person.

The picture shows the query (left) and the candidate (right) side by side, untinted, each
``panel_size`` px square (448 by default) with its ``grid x grid`` patch grid drawn faintly.
The few strongest plan entries (by transported mass) are drawn as numbered links, each in its
own colour, between the outlined patches they join; further links are hidden, or drawn thin and
faded with ``faded_matches``. Optional layers: the patch-weight heat map (with a colour legend)
and the share of each patch's mass that partial OT sent to the dummy ("unmatched"), as a red bar per cell.

Patches are indexed row-major: patch ``p`` sits at row ``p // grid`` and column ``p % grid``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["LINK_COLOURS", "Link", "render_match", "strongest_links"]

DEFAULT_PANEL = 448  # px per photo: the picture is 2 * 448 + gap wide
_GAP = 16  # px between the two panels
_TITLE_HEIGHT = 20  # px of the title strip, when a title is given
_LEGEND_HEIGHT = 22  # px of the legend strip under the panels, when a layer needs one
_BACKGROUND = (255, 255, 255)
_TITLE_COLOR = (0, 0, 0)
_GRID_COLOR = (255, 255, 255, 60)
_FADED_COLOR = (150, 150, 150, 140)  # grey: seen on photos and on the white gap
_HEAT_CMAP = "inferno"
_HEAT_ALPHA = 0.5
_UNMATCHED_COLOR = (230, 30, 30, 190)
_MIN_LINE_WIDTH = 1
_MAX_LINE_WIDTH = 4
_PX_PER_CELL = 4  # smallest patch cell, in px, that still makes a readable picture
#: Colour of link 1, 2, ... (Okabe-Ito and Tableau hues: told apart with most colour vision).
LINK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (255, 255, 255), (148, 103, 189), (140, 86, 75), (188, 189, 34), (23, 190, 207),
)


@dataclass(frozen=True)
class Link:
    """One plan entry: query patch ``i`` sent ``mass`` to candidate patch ``j``."""

    i: int
    j: int
    mass: float


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
        raise ValueError(f"plan must have shape ({n}, {n}) for grid={grid}, got {tuple(plan.shape)}")
    _check_values(plan, "plan")
    return plan


def _prepare_weights(weights: torch.Tensor | np.ndarray | None, grid: int, name: str) -> np.ndarray | None:
    if weights is None:
        return None
    weights = _to_numpy(weights, name)
    n = grid * grid
    if weights.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) for grid={grid}, got {tuple(weights.shape)}")
    _check_values(weights, name)
    return weights


def strongest_links(plan: torch.Tensor | np.ndarray, k: int) -> list[Link]:
    """The ``k`` largest positive entries of ``plan``, strongest first (ties: row-major order)."""
    plan = _to_numpy(plan, "plan")
    flat = plan.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    order = order[flat[order] > 0]
    m = plan.shape[1]
    return [Link(int(p // m), int(p % m), float(flat[p])) for p in order]


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


def _cell_box(p: int, grid: int, size: int, origin: tuple[int, int]) -> tuple[int, int, int, int]:
    edges = _cell_edges(grid, size)
    r, c = divmod(p, grid)
    return (origin[0] + edges[c], origin[1] + edges[r], origin[0] + edges[c + 1] - 1, origin[1] + edges[r + 1] - 1)


def _patch_centres(grid: int, size: int) -> np.ndarray:
    """(grid*grid, 2) array of patch centres (x, y) within a panel, row-major."""
    edges = _cell_edges(grid, size)
    mid = (edges[:-1] + edges[1:]) / 2.0
    ys, xs = np.meshgrid(mid, mid, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _heat_rgba(value: float) -> tuple[int, int, int, int]:
    r, g, b, _ = matplotlib.colormaps[_HEAT_CMAP](float(value))
    return (round(r * 255), round(g * 255), round(b * 255), round(_HEAT_ALPHA * 255))


def _draw_heat(draw: ImageDraw.ImageDraw, weights: np.ndarray, grid: int, size: int, origin: tuple[int, int]) -> None:
    top = weights.max()
    if top <= 0:
        return  # all-zero weights: nothing to tint
    for p, w in enumerate(weights):
        draw.rectangle(_cell_box(p, grid, size, origin), fill=_heat_rgba(w / top))


def _draw_unmatched(draw: ImageDraw.ImageDraw, unmatched: np.ndarray, grid: int, size: int,
                    origin: tuple[int, int]) -> None:
    """A red bar along the bottom of each cell: full width when all of the patch's mass went unmatched."""
    thick = max(2, size // grid // 12)
    for p, u in enumerate(np.clip(unmatched, 0.0, 1.0)):
        x0, _, x1, y1 = _cell_box(p, grid, size, origin)
        length = round((x1 - x0 - 2) * u)
        if length > 0:
            draw.rectangle((x0 + 1, y1 - thick, x0 + 1 + length, y1 - 1), fill=_UNMATCHED_COLOR)


def _draw_grid(draw: ImageDraw.ImageDraw, grid: int, size: int, origin: tuple[int, int]) -> None:
    ox, oy = origin
    for e in _cell_edges(grid, size)[1:-1]:
        draw.line([(ox + e, oy), (ox + e, oy + size - 1)], fill=_GRID_COLOR, width=1)
        draw.line([(ox, oy + e), (ox + size - 1, oy + e)], fill=_GRID_COLOR, width=1)


def _badge(draw: ImageDraw.ImageDraw, xy: tuple[float, float], number: int, colour: tuple[int, int, int],
           radius: int) -> None:
    x, y = xy
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour + (255,), outline=(0, 0, 0, 255))
    draw.text((x, y), str(number), fill=(0, 0, 0, 255), font=_font(max(8, round(radius * 1.3))), anchor="mm")


def _width(mass: float, top: float) -> int:
    return round(_MIN_LINE_WIDTH + (_MAX_LINE_WIDTH - _MIN_LINE_WIDTH) * mass / top)


def _draw_links(draw: ImageDraw.ImageDraw, links: list[Link], faded: list[Link], grid: int, size: int,
                origins: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """Faded links first, then the numbered ones (weakest first, so the strongest lie on top)."""
    if not links:
        return
    centres = _patch_centres(grid, size)
    (qx, qy), (cx, cy) = origins

    def ends(link: Link) -> list[tuple[float, float]]:
        return [(qx + centres[link.i, 0], qy + centres[link.i, 1]), (cx + centres[link.j, 0], cy + centres[link.j, 1])]

    for link in faded:
        draw.line(ends(link), fill=_FADED_COLOR, width=1)
    top = links[0].mass
    scale = max(1.0, size / 224)
    for rank in range(len(links) - 1, -1, -1):
        link, colour = links[rank], LINK_COLOURS[rank % len(LINK_COLOURS)]
        width = round(_width(link.mass, top) * scale)
        for p, origin in ((link.i, origins[0]), (link.j, origins[1])):
            draw.rectangle(_cell_box(p, grid, size, origin), outline=colour + (255,), width=max(2, round(scale * 1.5)))
        draw.line(ends(link), fill=colour + (255,), width=width)
        for end in ends(link):
            draw.ellipse((end[0] - width - 1, end[1] - width - 1, end[0] + width + 1, end[1] + width + 1),
                         fill=colour + (255,))
    # Badges last, so that no line hides a number; links sharing a patch put theirs side by side.
    radius = max(6, round(size / grid / 5))
    slots: dict[tuple[int, int], int] = {}
    for rank, link in enumerate(links):
        colour = LINK_COLOURS[rank % len(LINK_COLOURS)]
        for side, (p, origin) in enumerate(((link.i, origins[0]), (link.j, origins[1]))):
            slot = slots.get((side, p), 0)
            slots[(side, p)] = slot + 1
            x0, y0, x1, _ = _cell_box(p, grid, size, origin)
            per_row = max(1, (x1 - x0 - 2) // (2 * radius + 2))
            x = x0 + radius + 2 + (slot % per_row) * (2 * radius + 2)
            y = y0 + radius + 2 + (slot // per_row) * (2 * radius + 2)
            _badge(draw, (x, y), rank + 1, colour, radius)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, max_width: int) -> str:
    """Shorten ``text`` with a trailing '...' until it fits in ``max_width`` px."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def _draw_title(canvas: Image.Image, title: str) -> None:
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    text = _fit_text(draw, title, font, canvas.width - 8)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (canvas.width - (right - left)) / 2 - left
    y = (_TITLE_HEIGHT - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill=_TITLE_COLOR, font=font)


def _draw_legend(canvas: Image.Image, y: int, heatmap: bool, unmatched: bool) -> None:
    """The strip under the panels: the heat map's colour ramp, the unmatched bar's meaning."""
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    x = 6
    if heatmap:
        draw.text((x, y + 4), "patch weight: low", fill=_TITLE_COLOR, font=font)
        x += round(draw.textlength("patch weight: low ", font=font))
        for k in range(100):
            r, g, b, _ = _heat_rgba(k / 99)
            draw.line([(x + k, y + 4), (x + k, y + _LEGEND_HEIGHT - 5)], fill=(r, g, b))
        x += 104
        draw.text((x, y + 4), "high (relative to the image's largest)", fill=_TITLE_COLOR, font=font)
        x += round(draw.textlength("high (relative to the image's largest)", font=font)) + 24
    if unmatched:
        draw.rectangle((x, y + 8, x + 24, y + 13), fill=_UNMATCHED_COLOR[:3])
        draw.text((x + 30, y + 4), "share of the patch's mass sent to the dummy (unmatched; full width: all)",
                  fill=_TITLE_COLOR, font=font)


def render_match(
    query_image: Image.Image,
    candidate_image: Image.Image,
    plan: torch.Tensor | np.ndarray,
    *,
    grid: int = 7,
    query_weights: torch.Tensor | np.ndarray | None = None,
    candidate_weights: torch.Tensor | np.ndarray | None = None,
    top_matches: int = 6,
    faded_matches: int = 0,
    heatmap: bool = False,
    query_unmatched: torch.Tensor | np.ndarray | None = None,
    candidate_unmatched: torch.Tensor | np.ndarray | None = None,
    panel_size: int = DEFAULT_PANEL,
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
            (row-major patch indices). An all-zero plan draws no links.
        grid: Patches per side.
        query_weights: Optional ``(grid*grid,)`` non-negative query patch weights, drawn as a
            heat map (scaled by their maximum) only when ``heatmap`` is True.
        candidate_weights: Same for the candidate.
        top_matches: Number of strongest plan entries drawn as numbered links (1 = most mass),
            each in its own colour, with both patches outlined; width grows with mass.
        faded_matches: Number of further entries drawn as thin faded lines (0: hidden).
        heatmap: Tint the panels with the patch weights and add a legend strip.
        query_unmatched: Optional ``(grid*grid,)`` share of each query patch's mass (in [0, 1]) that
            partial OT sent to the dummy; drawn as a red bar per cell (with a legend strip).
        candidate_unmatched: Same for the candidate.
        panel_size: Side of each square panel in px.
        title: Optional text drawn in a strip above the panels.

    Returns:
        PNG bytes of an image ``2 * panel_size + 16`` px wide; ``panel_size`` px high, plus a
        20 px title strip on top when ``title`` is given and a 22 px legend strip at the bottom
        when a heat map or unmatched masses are drawn.

    Raises:
        ValueError: On a plan or weights of the wrong shape, with NaN/inf or negative entries,
            ``top_matches < 1``, ``faded_matches < 0``, ``grid < 1`` or ``panel_size < 4 * grid``.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if top_matches < 1:
        raise ValueError(f"top_matches must be >= 1, got {top_matches}")
    if faded_matches < 0:
        raise ValueError(f"faded_matches must be >= 0, got {faded_matches}")
    if panel_size < _PX_PER_CELL * grid:
        raise ValueError(f"panel_size must be >= {_PX_PER_CELL * grid} for grid={grid}, got {panel_size}")
    plan = _prepare_plan(plan, grid)
    query_weights = _prepare_weights(query_weights, grid, "query_weights")
    candidate_weights = _prepare_weights(candidate_weights, grid, "candidate_weights")
    query_unmatched = _prepare_weights(query_unmatched, grid, "query_unmatched")
    candidate_unmatched = _prepare_weights(candidate_unmatched, grid, "candidate_unmatched")
    show_heat = heatmap and (query_weights is not None or candidate_weights is not None)
    show_unmatched = query_unmatched is not None or candidate_unmatched is not None

    top = _TITLE_HEIGHT if title is not None else 0
    legend = _LEGEND_HEIGHT if (show_heat or show_unmatched) else 0
    origins = ((0, top), (panel_size + _GAP, top))
    canvas = Image.new("RGB", (2 * panel_size + _GAP, top + panel_size + legend), _BACKGROUND)
    canvas.paste(_to_rgb(query_image, panel_size, "query_image"), origins[0])
    canvas.paste(_to_rgb(candidate_image, panel_size, "candidate_image"), origins[1])

    # Heat maps are blended with the photos; grid, unmatched bars and links go on a second layer.
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    heat_draw = ImageDraw.Draw(layer)
    if show_heat:
        for weights, origin in ((query_weights, origins[0]), (candidate_weights, origins[1])):
            if weights is not None:
                _draw_heat(heat_draw, weights, grid, panel_size, origin)
    marks = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(marks)
    for origin in origins:
        _draw_grid(draw, grid, panel_size, origin)
    for unmatched, origin in ((query_unmatched, origins[0]), (candidate_unmatched, origins[1])):
        if unmatched is not None:
            _draw_unmatched(draw, unmatched, grid, panel_size, origin)
    links = strongest_links(plan, top_matches + faded_matches)
    _draw_links(draw, links[:top_matches], links[top_matches:], grid, panel_size, origins)

    out = Image.alpha_composite(Image.alpha_composite(canvas.convert("RGBA"), layer), marks).convert("RGB")
    if title is not None:
        _draw_title(out, title)
    if legend:
        _draw_legend(out, top + panel_size, show_heat, show_unmatched)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
