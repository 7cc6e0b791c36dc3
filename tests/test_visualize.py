"""Tests for reranker.visualize.render_match."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from reranker.visualize import render_match

G = 7
N = G * G
SIZE = 448  # the default panel (was 224 before issue 14: the picture is now 2 x 448 + 16 px wide)
GAP = 16
CELL = SIZE // G  # 32 px: cells tile the panel exactly for these sizes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WHITE = (255, 255, 255)


def _open(png: bytes) -> Image.Image:
    assert png.startswith(PNG_SIGNATURE)
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG"
    return img.convert("RGB")


def _centre(p: int) -> tuple[float, float]:
    """Centre (x, y) of patch ``p`` within a panel."""
    r, c = divmod(p, G)
    return (c + 0.5) * CELL, (r + 0.5) * CELL


@pytest.fixture
def images() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    q = Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8))
    c = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    return q, c


def _single(i: int, j: int, mass: float = 1.0) -> np.ndarray:
    plan = np.zeros((N, N))
    plan[i, j] = mass
    return plan


def _gap(img: Image.Image) -> np.ndarray:
    """Pixels of the gap strip between the panels (title strip excluded)."""
    arr = np.asarray(img)
    return arr[img.height - SIZE :, SIZE : SIZE + GAP]


@pytest.mark.parametrize("title", [None, "query 3 vs candidate 17"])
def test_png_and_size(images, title):
    q, c = images
    plan = np.random.default_rng(1).random((N, N))
    img = _open(render_match(q, c, plan, title=title))
    assert img.width == 2 * SIZE + GAP
    if title is None:
        assert img.height == SIZE
    else:
        assert img.height > SIZE
        strip = np.asarray(img)[: img.height - SIZE]
        assert (strip != 255).any(), "title text was not drawn"


def test_size_follows_panel_size(images):
    q, c = images
    img = _open(render_match(q, c, np.ones((N, N)), panel_size=100))
    assert img.size == (2 * 100 + GAP, 100)


def test_title_height_is_fixed(images):
    q, c = images
    short = _open(render_match(q, c, np.ones((N, N)), title="a"))
    long = _open(render_match(q, c, np.ones((N, N)), title="x" * 500))
    assert short.size == long.size


def test_torch_and_numpy_inputs_agree(images):
    q, c = images
    rng = np.random.default_rng(2)
    plan = rng.random((N, N)).astype(np.float32)
    w = rng.random(N).astype(np.float32)
    w /= w.sum()
    from_numpy = render_match(q, c, plan, query_weights=w, candidate_weights=w)
    from_torch = render_match(
        q,
        c,
        torch.from_numpy(plan).double(),
        query_weights=torch.from_numpy(w),
        candidate_weights=torch.from_numpy(w).requires_grad_(),
    )
    assert np.array_equal(np.asarray(_open(from_numpy)), np.asarray(_open(from_torch)))


def test_weights_overlay_changes_only_its_panel(images):
    q, c = images
    plan = np.zeros((N, N))
    w = np.zeros(N)
    w[0] = 1.0
    plain = np.asarray(_open(render_match(q, c, plan))).astype(int)
    heat = _open(render_match(q, c, plan, query_weights=w, heatmap=True))
    assert heat.height > SIZE, "a heat map comes with its legend strip"
    weighted = np.asarray(heat).astype(int)[:SIZE]
    diff = np.abs(plain - weighted).sum(-1)
    assert diff[:, :SIZE].any(), "query heat map not drawn"
    assert not diff[:, SIZE:].any(), "query weights leaked outside the query panel"

    both = np.asarray(
        _open(render_match(q, c, plan, query_weights=w, candidate_weights=w, heatmap=True))
    ).astype(int)[:SIZE]
    assert np.abs(plain - both).sum(-1)[:, SIZE + GAP :].any(), "candidate heat map not drawn"


def test_all_zero_plan_draws_no_lines(images):
    q, c = images
    img = _open(render_match(q, c, np.zeros((N, N))))
    assert (_gap(img) == 255).all()


def test_line_crosses_gap_at_expected_height(images):
    q, c = images
    # Query patch (3, 6) -> candidate patch (3, 0): a horizontal line at the row-3 centre.
    i, j = 3 * G + 6, 3 * G + 0
    for title in (None, "t"):
        img = _open(render_match(q, c, _single(i, j), title=title))
        gap = _gap(img)
        y = int(_centre(i)[1])
        assert (gap[y] != 255).any(axis=-1).all(), "line missing across the gap"
        assert (gap[: y - 8] == 255).all() and (gap[y + 8 :] == 255).all()


def test_diagonal_line_crosses_gap_where_expected(images):
    q, c = images
    # Query patch (0, 6) -> candidate patch (6, 0): the line is steep enough to
    # pass through the gap at a height computable from the two centres.
    i, j = 0 * G + 6, 6 * G + 0
    img = _open(render_match(q, c, _single(i, j)))
    (x0, y0), (x1, y1) = _centre(i), _centre(j)
    x1 += SIZE + GAP
    xm = SIZE + GAP // 2
    ym = y0 + (y1 - y0) * (xm - x0) / (x1 - x0)
    gap = _gap(img)
    column = gap[:, GAP // 2]
    drawn = np.flatnonzero((column != 255).any(axis=-1))
    assert drawn.size > 0
    assert abs(drawn.mean() - ym) < 4
    # Nothing in the gap far from the line (lines are drawn wider on larger panels: SIZE / 224 times).
    far = 12 * SIZE // 224
    assert (column[: int(ym) - far] == 255).all() and (column[int(ym) + far :] == 255).all()


def test_line_goes_from_query_row_to_candidate_column(images):
    q, c = images
    # plan[i, j]: query patch i (left) -> candidate patch j (right). Both in column 6,
    # so the line is shallow and crosses the gap close to the query end, which
    # tells a swapped (j, i) line apart.
    i, j = 1 * G + 6, 5 * G + 6
    img = _open(render_match(q, c, _single(i, j)))
    blank = _open(render_match(q, c, np.zeros((N, N))))
    (x0, y0), (x1, y1) = _centre(i), _centre(j)
    x1 += SIZE + GAP
    xm = SIZE + GAP // 2
    ym = y0 + (y1 - y0) * (xm - x0) / (x1 - x0)
    drawn = np.flatnonzero((_gap(img)[:, GAP // 2] != 255).any(axis=-1))
    assert drawn.size > 0 and abs(drawn.mean() - ym) < 4

    changed = (np.asarray(img).astype(int) != np.asarray(blank)).any(axis=-1)
    assert changed[int(y0), int(x0)] and changed[int(y1), int(x1)], "end dots missing"
    # The swapped ends (query patch j, candidate patch i) stay untouched.
    (sx0, sy0), (sx1, sy1) = _centre(j), _centre(i)
    assert not changed[int(sy0), int(sx0)] and not changed[int(sy1), int(sx1) + SIZE + GAP]


def test_top_matches_limits_lines(images):
    q, c = images
    strong, weak = 1 * G + 6, 5 * G + 6
    plan = np.zeros((N, N))
    plan[strong, 1 * G] = 1.0
    plan[weak, 5 * G] = 0.5
    y_strong, y_weak = int(_centre(strong)[1]), int(_centre(weak)[1])

    gap = _gap(_open(render_match(q, c, plan, top_matches=1)))
    assert (gap[y_strong] != 255).any()
    assert (gap[y_weak] == 255).all(), "weaker match drawn despite top_matches=1"

    gap = _gap(_open(render_match(q, c, plan, top_matches=2)))
    assert (gap[y_strong] != 255).any() and (gap[y_weak] != 255).any()
    # Mass sets colour and width: the two lines must look different.
    assert not np.array_equal(gap[y_strong], gap[y_weak])
    thickness = lambda y: int((gap[y - 6 : y + 7, GAP // 2] != 255).any(axis=-1).sum())  # noqa: E731
    assert thickness(y_strong) > thickness(y_weak)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16", "LA", "CMYK"])
def test_image_modes(images, mode):
    q, c = images
    img = _open(render_match(q.convert(mode), c.convert(mode), _single(0, 0)))
    assert img.size == (2 * SIZE + GAP, SIZE)


def test_non_image_rejected():
    with pytest.raises(TypeError):
        render_match(np.zeros((8, 8, 3)), Image.new("RGB", (8, 8)), np.zeros((N, N)))


def _bad(kind: str):
    plan = np.ones((N, N))
    if kind == "nan":
        plan[0, 0] = np.nan
    elif kind == "inf":
        plan[0, 0] = np.inf
    elif kind == "negative":
        plan[0, 0] = -1e-6
    return plan


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(plan=np.ones(N)), "shape"),
        (dict(plan=np.ones((N, N, 1))), "shape"),
        (dict(plan=np.ones((N, N - 1))), "shape"),
        (dict(plan=np.ones((36, 36))), "shape"),
        (dict(plan=torch.ones(N + 1, N + 1)), "shape"),
        (dict(plan=_bad("nan")), "NaN"),
        (dict(plan=_bad("inf")), "inf"),
        (dict(plan=torch.from_numpy(_bad("negative"))), "negative"),
        (dict(query_weights=np.ones(N - 1)), "query_weights"),
        (dict(candidate_weights=torch.ones(N + 1)), "candidate_weights"),
        (dict(query_weights=np.ones((G, G))), "query_weights"),
        (dict(query_weights=np.full(N, np.nan)), "NaN"),
        (dict(candidate_weights=-np.ones(N)), "negative"),
        (dict(top_matches=0), "top_matches"),
        (dict(top_matches=-3), "top_matches"),
        (dict(panel_size=G * 4 - 1), "panel_size"),
        (dict(grid=0, plan=np.ones((0, 0))), "grid"),
    ],
)
def test_invalid_inputs(images, kwargs, match):
    q, c = images
    kwargs = {"plan": np.ones((N, N)), **kwargs}
    with pytest.raises(ValueError, match=match):
        render_match(q, c, **kwargs)


def test_smallest_panel_and_other_grid(images):
    q, c = images
    img = _open(render_match(q, c, np.eye(16), grid=4, panel_size=16))
    assert img.size == (2 * 16 + GAP, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_plan(images):
    q, c = images
    plan = torch.rand(N, N, device="cuda", dtype=torch.float16)
    img = _open(render_match(q, c, plan, query_weights=torch.rand(N, device="cuda")))
    assert img.size == (2 * SIZE + GAP, SIZE)


# --- issue 14: a picture a person can read ---------------------------------------------------------
def _panels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)[img.height - SIZE if img.height == SIZE else 0 :][:SIZE]


def test_default_picture_is_large_and_untinted(images):
    """Weights given but no heat map asked: the photos are not tinted (only the faint grid is drawn)."""
    q, c = images
    w = np.random.default_rng(3).random(N)
    img = _open(render_match(q, c, np.zeros((N, N)), query_weights=w, candidate_weights=w))
    assert img.size == (2 * 448 + GAP, 448)
    expected = np.asarray(q.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)).astype(int)
    drawn = np.asarray(img).astype(int)[:, :SIZE]
    off_grid = np.ones((SIZE, SIZE), bool)
    for e in range(CELL, SIZE, CELL):
        off_grid[:, e] = off_grid[e, :] = False
    assert np.array_equal(drawn[off_grid], expected[off_grid]), "the query photo was altered off the grid lines"


@pytest.mark.parametrize("size", [224, 448, 640])
def test_panel_size_sets_the_picture_size(images, size):
    q, c = images
    img = _open(render_match(q, c, np.ones((N, N)), panel_size=size, title="t"))
    assert img.size == (2 * size + GAP, size + 20)


def test_links_are_numbered_colour_distinct_and_outline_their_patches(images):
    from reranker.visualize import LINK_COLOURS, strongest_links

    q, c = images
    black = [Image.new("RGB", (200, 200)), Image.new("RGB", (200, 200))]
    plan = np.zeros((N, N))
    pairs = [(0, 8, 0.3), (24, 30, 0.2), (48, 40, 0.1)]  # (query patch, candidate patch, mass)
    for i, j, m in pairs:
        plan[i, j] = m
    assert [(l.i, l.j) for l in strongest_links(plan, 5)] == [(i, j) for i, j, _ in pairs]
    img = np.asarray(_open(render_match(*black, plan, top_matches=3))).astype(int)
    for rank, (i, j, _) in enumerate(pairs):
        colour = np.array(LINK_COLOURS[rank])
        for p, ox in ((i, 0), (j, SIZE + GAP)):
            r, col = divmod(p, G)
            # the outline: the cell's right border, half way down, has the link's colour
            x, y = ox + (col + 1) * CELL - 2, r * CELL + CELL // 2 + 6
            assert np.abs(img[y, x] - colour).sum() < 30, (rank, p, img[y, x])
            # the badge: near the cell's top-left corner, with a dark number on the link's colour
            badge = img[r * CELL + 3 : r * CELL + 30, ox + col * CELL + 3 : ox + col * CELL + 30]
            assert (np.abs(badge - colour).sum(-1) < 30).sum() > 50, "badge colour missing"
            assert (badge.sum(-1) < 100).sum() > 5, "badge number missing"
    assert len({LINK_COLOURS[k] for k in range(3)}) == 3


def test_badge_numbers_differ():
    """Link 1 and link 2 at the same place and colour-free comparison: the badges' digits differ."""
    black = [Image.new("RGB", (200, 200)), Image.new("RGB", (200, 200))]
    one = np.zeros((N, N)); one[0, 0] = 1.0
    two = np.zeros((N, N)); two[0, 0] = 0.5; two[6, 6] = 1.0
    a = np.asarray(_open(render_match(*black, one))).astype(int)[:CELL, :CELL]
    b = np.asarray(_open(render_match(*black, two))).astype(int)[:CELL, :CELL]
    assert ((a.sum(-1) < 100) != (b.sum(-1) < 100)).any()


def test_only_the_strongest_links_are_drawn_unless_faded_ones_are_asked(images):
    q, c = images
    plan = np.zeros((N, N))
    plan[1 * G + 6, 1 * G] = 1.0
    plan[5 * G + 6, 5 * G] = 0.5
    y_weak = int(_centre(5 * G + 6)[1])
    hidden = _gap(_open(render_match(q, c, plan, top_matches=1)))
    assert (hidden[y_weak] == 255).all()
    faded = _gap(_open(render_match(q, c, plan, top_matches=1, faded_matches=1)))
    drawn = faded[y_weak][(faded[y_weak] != 255).any(-1)]
    assert len(drawn) > 0, "the faded link is missing"


def test_unmatched_mass_is_drawn_per_patch_with_a_legend(images):
    q, c = images
    plan = np.zeros((N, N))
    u = np.zeros(N)
    u[10] = 0.2
    plain = _open(render_match(q, c, plan))
    shown = _open(render_match(q, c, plan, query_unmatched=u))
    assert shown.height == plain.height + 22  # the legend strip
    diff = (np.asarray(shown).astype(int)[:SIZE] != np.asarray(plain).astype(int)).any(-1)
    r, col = divmod(10, G)
    cell = np.zeros_like(diff)
    cell[r * CELL : (r + 1) * CELL, col * CELL : (col + 1) * CELL] = True
    assert diff[cell].any() and not diff[~cell].any(), "the unmatched bar is not (only) in its cell"
    legend = np.asarray(shown)[SIZE:]
    assert (legend != 255).any(), "legend not drawn"


def test_links_sharing_a_patch_show_both_numbers():
    from reranker.visualize import LINK_COLOURS

    black = [Image.new("RGB", (200, 200)), Image.new("RGB", (200, 200))]
    plan = np.zeros((N, N))
    plan[0, 10], plan[0, 20] = 0.5, 0.4  # both links leave query patch 0
    cell = np.asarray(_open(render_match(*black, plan, top_matches=2))).astype(int)[:CELL, :CELL]
    for rank in (0, 1):
        assert (np.abs(cell - np.array(LINK_COLOURS[rank])).sum(-1) < 30).sum() > 50, f"badge {rank + 1} hidden"
