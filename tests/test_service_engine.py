"""The inference engine: queries that arrive together form one batch; a full queue refuses at once."""

from __future__ import annotations

import time

import pytest
import torch

from indexer.loading import load_image
from indexer.search import SearchSettings
from service.engine import Engine, QueueFullError
from service.settings import ServiceSettings
from service_support import photos, session_index  # noqa: F401 (photos: a fixture)


@pytest.fixture()
def engine(shared_data, tmp_path_factory):
    index = session_index(tmp_path_factory, shared_data)
    eng = Engine.open(ServiceSettings(index=index, device="cpu", queue_size=4, max_batch=3)).start()
    yield eng
    eng.close()


def _wait_until_taken(engine: Engine) -> None:
    deadline = time.monotonic() + 30
    while engine.queue_depth() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue_depth() == 0


def test_queries_that_arrive_together_are_batched(engine, photos):
    a, b = SearchSettings(top_k=5, rerank_k=10), SearchSettings(top_k=5, rerank_k=10, s=0.5)
    images = [load_image(p) for p in photos[:5]]
    alone = [engine.search(im, st, timeout=60) for im, st in zip(images, (a, a, a, b, a))]
    assert all(o.batch_size == 1 for o in alone)
    with engine._lock:  # the worker takes the first query, then waits here while four more queue up
        first = engine.submit(images[0], a)
        _wait_until_taken(engine)
        rest = [engine.submit(im, st) for im, st in zip(images[1:], (a, a, b, a))]
        with pytest.raises(QueueFullError) as full:  # the queue holds 4
            engine.submit(images[0], a)
        assert full.value.retry_after >= 1
    outcomes = [f.result(60) for f in [first, *rest]]
    # Next batch: the three queued first (max_batch), grouped by settings (a, a | b); then the last one.
    assert [o.batch_size for o in outcomes] == [1, 2, 2, 1, 1]
    for x, y in zip(alone, outcomes):  # batching changes nothing in the answers beyond float noise
        assert [h.id for h in x.result.hits] == [h.id for h in y.result.hits]
        for hx, hy in zip(x.result.hits, y.result.hits):
            assert hx.global_score == pytest.approx(hy.global_score, abs=1e-5)
            # sigma is within 1e-4 of its converged value at the solver's default tolerance
            assert hx.final_score == pytest.approx(hy.final_score, abs=2e-4)
        assert y.timings_ms["queue"] >= 0 and y.timings_ms["total"] >= y.timings_ms["embed"]
    assert outcomes[1].timings_ms["queue"] > outcomes[0].timings_ms["queue"]  # they waited for the lock


def test_a_failing_query_fails_alone(engine, photos):
    bad = SearchSettings(top_k=5, marginals="rollout", s=2.0)  # invalid: the searcher raises
    good = SearchSettings(top_k=5)
    with engine._lock:
        f_bad = engine.submit(load_image(photos[0]), bad)
        f_good = engine.submit(load_image(photos[1]), good)
    with pytest.raises(ValueError):
        f_bad.result(60)
    assert len(f_good.result(60).result.hits) == 5
    assert len(engine.search(load_image(photos[2]), good, timeout=60).result.hits) == 5  # the worker lives


def test_torch_threads_setting_limits_torch_and_searches_the_same(shared_data, tmp_path_factory, photos):
    index = session_index(tmp_path_factory, shared_data)
    before = torch.get_num_threads()
    query = load_image(photos[3])
    try:
        default = Engine.open(ServiceSettings(index=index, device="cpu")).start()
        try:
            expected = default.search(query, SearchSettings(top_k=5), timeout=60).result.hits
        finally:
            default.close()
        one = Engine.open(ServiceSettings(index=index, device="cpu", torch_threads=1)).start()
        seen: list[int] = []  # the torch threads of the thread that runs each search
        search = one.searcher.search
        one.searcher.search = lambda *a, **k: (seen.append(torch.get_num_threads()), search(*a, **k))[1]
        try:
            hits = one.search(query, SearchSettings(top_k=5), timeout=60).result.hits
        finally:
            one.close()
        assert one.torch_threads == 1 and seen == [1]
        assert torch.get_num_threads() == before  # the setting is the inference thread's, not the caller's
        assert [h.id for h in hits] == [h.id for h in expected]
        assert [h.final_score for h in hits] == pytest.approx([h.final_score for h in expected], abs=2e-4)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="torch_threads"):
        ServiceSettings(index=index, torch_threads=0)
