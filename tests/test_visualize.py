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
SIZE = 224
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
    weighted = np.asarray(_open(render_match(q, c, plan, query_weights=w))).astype(int)
    diff = np.abs(plain - weighted).sum(-1)
    assert diff[:, :SIZE].any(), "query heat map not drawn"
    assert not diff[:, SIZE:].any(), "query weights leaked outside the query panel"

    both = np.asarray(
        _open(render_match(q, c, plan, query_weights=w, candidate_weights=w))
    ).astype(int)
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
    # Nothing in the gap far from the line.
    assert (column[: int(ym) - 12] == 255).all() and (column[int(ym) + 12 :] == 255).all()


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
