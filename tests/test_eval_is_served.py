"""What is evaluated is what is served: eval's reranked order of a query equals a served search's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from evaluation.datasets import load_dataset
from evaluation.features import cache_key, compute_features
from evaluation.protocol import Structural, Sweep, evaluate, reranked_order
from indexer import build_index
from indexer.build import IndexSpec
from indexer.index_dir import IndexDir
from indexer.loading import load_image
from indexer.search import Searcher, SearchSettings
from indexer.sources import from_folder
from reranker.backbones import create_index_backbone
from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

CPU = torch.device("cpu")


pytestmark = [pytest.mark.real_backbone, pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def pairs_set(tmp_path_factory, shared_data):
    """Three corridor queries and sixteen corridor references (real photos: the real backbone's global
    cosines are distinct, so no near-tie of float noise decides an order); every reference a positive."""
    corridor = shared_data / "corridor"
    root = tmp_path_factory.mktemp("pairs")
    picked = {"query": [0, 40, 80], "ref": list(range(0, 111, 7))}
    for folder, numbers in picked.items():
        (root / folder).mkdir()
        for i in numbers:
            shutil.copy(corridor / folder / f"{i:07d}.jpg", root / folder / f"{i:07d}.jpg")
    refs = " ".join(f"ref/{i:07d}.jpg" for i in picked["ref"])
    (root / "ground_truth.csv").write_text("query,matching_refs\n" + "".join(
        f"query/{i:07d}.jpg,{refs}\n" for i in picked["query"]))
    return root


@pytest.mark.parametrize("structural,lam", [(Structural("mnn", threshold=0.5), 2.0),
                                            (Structural("ot", "rollout", 0.7), 0.5)])
def test_eval_ranks_each_query_as_the_served_search_does(pairs_set, real_weights, tmp_path, structural, lam):
    backbone = create_index_backbone(DEFAULT_MODEL, str(real_weights), model_kwargs=default_model_kwargs(DEFAULT_MODEL))
    K = 16
    # served: an index of the references, searched with the same setting
    refs = from_folder(pairs_set / "ref")
    # the stored weights the OT reads (a native-grid index stores none unless asked: indexer.build.default_patch_weights)
    build_index(tmp_path / "index", backbone, refs, IndexSpec(patch_weights=structural.weight_kind), workers=0,
                progress=False)
    settings = SearchSettings(top_k=K, rerank_k=K, scorer=structural.scorer, threshold=structural.threshold,
                              s=structural.s, marginals=structural.marginals, lam=lam)
    # evaluated: the same set by the place protocol, over cached features
    data = load_dataset("pairs", str(pairs_set))
    records = data.queries + data.database
    kinds = [structural.weight_kind or "uniform"]
    store = compute_features(backbone, records, cache_key(data.name, data.root, records, backbone, {}, kinds),
                             tmp_path / "cache", workers=0, progress=False)
    sweep = Sweep([structural.marginals], [structural.s], [K], [lam], scorers=[structural.scorer],
                  thresholds=[structural.threshold])
    outcome = evaluate(data, store, sweep, CPU, progress=False)
    order = reranked_order(outcome.ranking, outcome.sigma[structural], K, lam)
    with IndexDir.open(tmp_path / "index") as index_dir:
        searcher = Searcher(index_dir, backbone, CPU)
        for q, query_row in enumerate(outcome.ranking.query_rows):
            evaluated = [store.ids[row].removeprefix("ref/") for row in outcome.ranking.rows[q][order[q]]]
            (served,) = searcher.search([load_image(records[query_row].path)], settings)
            assert [h.id for h in served.hits] == evaluated
            # the same first-stage cosines (FAISS here, torch there: equal to float noise, so near-ties may
            # swap their global ranks, but never the final order above)
            np.testing.assert_allclose([h.global_score for h in served.hits],
                                       outcome.ranking.scores[q][order[q]], atol=1e-5)
