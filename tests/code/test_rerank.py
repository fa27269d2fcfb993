"""Re-ranker and the shared item-feature table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.features import build_item_features
from serving.api.rerank import RerankConfig, Reranker


def _catalog():
    return pd.DataFrame({"item_id": ["a", "b", "c", "d"], "available": [True, True, False, True],
                         "region": ["EU", "US", "EU", "EU"], "price": [10.0, 20.0, 30.0, 40.0]})


def test_debiased_ctr_credits_clicks_per_examination():
    # a and b both got 1 click in 2 impressions; a was shown at position 1 (theta 1.0),
    # b at position 4 (theta 0.25): b's click came from far fewer examinations
    imp = pd.DataFrame({"item_id": ["a", "a", "b", "b"], "position": [1, 1, 4, 4],
                        "clicked": [True, False, True, False], "saved": [False] * 4})
    f = build_item_features(_catalog(), imp, [1.0, 0.5, 0.3, 0.25]).set_index("item_id")
    assert f.loc["a", "examinations"] == pytest.approx(2.0)
    assert f.loc["b", "examinations"] == pytest.approx(0.5)
    assert f.loc["b", "debiased_ctr"] > f.loc["a", "debiased_ctr"]
    # never shown: the global prior (2 clicks / 2.5 examinations)
    assert f.loc["d", "debiased_ctr"] == pytest.approx(0.8)


def test_rerank_drops_sold_out_boosts_region_and_keeps_similarity_first():
    feats = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "available": [True, True, False, True],
                          "region": ["EU", "US", "EU", "EU"], "price": [1.0] * 4,
                          "debiased_ctr": [0.1] * 4})
    r = Reranker(feats, RerankConfig(w_region=0.05, w_engagement=0.0))
    hits = [("b", 0.90), ("a", 0.88), ("c", 0.95), ("d", 0.50), ("zz", 0.99)]
    out = r.rerank(hits, k=3, region="EU")
    assert [x.item_id for x in out] == ["a", "b", "d"]  # c sold out, zz unknown
    assert out[0].score == pytest.approx(0.93) and out[0].similarity == pytest.approx(0.88)
    assert [x.item_id for x in r.rerank(hits, k=3)] == ["b", "a", "d"]


def test_engagement_breaks_near_ties():
    feats = pd.DataFrame({"item_id": ["a", "b"], "available": [True, True],
                          "region": ["EU", "EU"], "price": [1.0, 1.0],
                          "debiased_ctr": [0.05, 0.4]})
    out = Reranker(feats, RerankConfig(w_engagement=0.02)).rerank([("a", 0.80), ("b", 0.79)], 2)
    assert [x.item_id for x in out] == ["b", "a"]
    assert out[0].score - out[1].score == pytest.approx(0.02 * np.log(8) - 0.01)
