"""The benchmark reports' arithmetic on small hand-made inputs: per-stage breakdown, Triton
counter deltas, rollout stage grouping, the bench.json aggregation and its markdown table."""

from __future__ import annotations

import pytest

from bench.rollout import stage_times
from bench.run import CONCURRENCY, aggregate, markdown
from bench.serve import summarize_level, triton_delta


def _rows(latencies, detect_embed=8.0, fanout=4.0, rerank=0.5, total=14.0):
    return [(ms, {"timings": {"detect_embed_ms": detect_embed, "fanout_ms": fanout,
                              "rerank_ms": rerank, "total_ms": total},
                  "partial": i == 0, "hedges": 1}) for i, ms in enumerate(latencies)]


def test_summarize_level_splits_what_lies_outside_the_stages():
    lv = summarize_level(_rows([16.0, 18.0, 20.0, 22.0]), wall_s=2.0, errors=1)
    assert lv["requests"] == 4 and lv["errors"] == 1 and lv["qps"] == 2.0
    assert lv["p50_ms"] == 19.0 and lv["p99_ms"] == pytest.approx(21.94)
    assert lv["partial_responses"] == 1 and lv["hedges_fired"] == 4
    st = lv["stages"]
    assert st["api_other_ms"]["p50"] == pytest.approx(14.0 - 12.5)  # total minus the stages
    assert st["outside_api_ms"]["mean"] == pytest.approx(19.0 - 14.0)  # client wall - total
    with pytest.raises(ValueError, match="no successful requests"):
        summarize_level([], 1.0, 3)


def test_triton_delta_means_per_request_and_batch_size():
    before = {("embedder", "nv_inference_request_success"): 10.0,
              ("embedder", "nv_inference_exec_count"): 10.0,
              ("embedder", "nv_inference_queue_duration_us"): 1000.0,
              ("embedder", "nv_inference_compute_infer_duration_us"): 20000.0}
    after = {("embedder", "nv_inference_request_success"): 110.0,
             ("embedder", "nv_inference_exec_count"): 35.0,
             ("embedder", "nv_inference_queue_duration_us"): 201000.0,
             ("embedder", "nv_inference_compute_infer_duration_us"): 320000.0,
             ("detector", "nv_inference_request_success"): 0.0}
    d = triton_delta(before, after)
    assert set(d) == {"embedder"}  # a model without requests in the window is left out
    assert d["embedder"] == {"requests": 100, "mean_batch": 4.0, "queue_ms": 2.0,
                             "compute_ms": 3.0, "request_ms": 0.0}


def test_stage_times_groups_mapped_tasks():
    stages = stage_times({"plan": {"seconds": 0.5}, "embed_partition[0]": {"seconds": 3.0},
                          "embed_partition[1]": {"seconds": 5.0}, "configure": {"seconds": 1.0},
                          "build_shard[0]": {"seconds": 7.0}})
    assert list(stages) == ["configure", "plan", "embed_partition", "build_shard"]
    assert stages["embed_partition"] == {"tasks": 2, "sum_s": 8.0, "max_s": 5.0}


def _serve() -> dict:
    levels = {c: summarize_level(_rows([10.0 * int(c)] * 3), 1.0, 0) for c in CONCURRENCY}
    for lv in levels.values():
        lv["cpu_ms_per_query"] = {"api": 5.0, "triton": 12.0}
        lv["cpu_utilization"] = 0.5
    return {"cores": 2, "loadavg": {c: {"before": [1.0, 1.0, 1.0]} for c in CONCURRENCY},
            "what": "search",
            "index": "large", "queries": "scenes", "levels": levels,
            "stages": {c: lv["stages"] for c, lv in levels.items()},
            "alone": {"total_cpu_ms_per_query": 10.0}, "compute_bound_qps": 200.0,
            "qps_c8_over_compute_bound": 0.015, "p95_c1_over_floor": 1.0,
            "stack_cpu_bound_qps_c8": 117.6,
            "machinery_cpu_ms_per_query_c8": 7.0, "aims": {"p95_ms_c1_le_50": True}}


def _index() -> dict:
    return {"items": 7200, "n_shards": 2, "recall_at_10": 0.98, "qps_per_shard": 5000.0,
            "qps_per_shard_faiss_index": 7000.0, "hnswlib_qps_at_equal_recall": 8000.0,
            "qps_ratio_vs_hnswlib": 0.875, "shard_qps_over_hnswlib": 0.625,
            "store_over_faiss_index": 0.71, "bytes_per_vector_hnsw": 720.0,
            "bytes_per_vector_pq": 47.0, "hnswlib_bytes_per_vector": 1172.0,
            "ivfpq": {"recall_at_10": 0.95, "qps": 3000.0}, "inserts_per_s": 50000.0,
            "streaming": {"ingest_to_searchable_p50_s": 0.1},
            "ingest_to_searchable_p95_s": 0.18}


def test_aggregate_and_markdown():
    reembed = {"images_per_s": 2.0, "embedder_only_images_per_s": 4.0, "what": "photos"}
    rollout = {"dag_id": "loupe_model_rollout", "items": 7200, "model": "attributes/0",
               "executor": "dag.test()", "wall_seconds": 30.0,
               "stages": stage_times({"embed_partition[0]": {"seconds": 3.0}})}
    gpu = {"skipped": True, "reason": "GPU variant skipped: no GPU"}
    report = aggregate(_index(), _serve(), rollout, reembed, gpu)
    assert report["reembed"]["projected_large_world_hours"] == 1.0  # 7200 items at 2/s
    assert report["serving"]["latency"]["8"] == {"p50_ms": 80.0, "p95_ms": 80.0,
                                                 "p99_ms": 80.0, "qps": 3.0}
    assert report["serving"]["stages_p50_ms"]["1"]["fanout_ms"] == 4.0
    assert report["index"]["recall_at_10_pq"] == 0.95
    assert report["index"]["shard_qps_over_hnswlib"] == 0.625
    md = markdown(report)
    assert "| 8 | 80.0 | 80.0 | 80.0 | 3.0 |" in md
    assert "| 1 | 8.0 / 8.0 | 4.0 / 4.0 | 0.5 / 0.5 |" in md
    assert "| embed_partition | 1 | 3.0 | 3.0 |" in md
    assert "| 4 | 5.0 | 12.0 | 50% |" in md
    assert "GPU variant skipped: no GPU" in md
    assert "p95_ms_c1_le_50: met" in md and "c=8 [1.0, 1.0, 1.0]" in md
    assert "floor = 1.0" in md and "(shard_qps_over_hnswlib) | 0.62 |" in md


def test_debias_seed_study_trains_both_variants_per_seed(tiny_world, tiny_harvest, tmp_path):
    import json

    import yaml

    from bench.debias_seeds import run

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {
        "tuned_blocks": 0, "tune_conv_head": False, "views": 2, "batch_size": 64,
        "max_epochs": 2, "hard_negative_pool": 5}}))
    result = run(tiny_world, tiny_harvest, [0, 1], tmp_path / "work", params)
    assert [r["seed"] for r in result["seeds"]] == [0, 1] and result["n_seeds"] == 2
    for r in result["seeds"]:
        assert 0 < r["debiased_recall_at_10"] <= 1 and 0 < r["naive_recall_at_10"] <= 1
        assert r["diff"] == pytest.approx(r["debiased_recall_at_10"] - r["naive_recall_at_10"],
                                          abs=2e-4)
        assert r["ci95"][0] <= r["diff"] <= r["ci95"][1]
        assert all(0 <= share <= 1 for share in r["top10_same_colour_other_style"].values())
        for variant in ("debiased", "naive"):  # each variant trained with that seed
            cfg = json.loads((tmp_path / "work" / f"seed{r['seed']}" / variant /
                              "train.json").read_text())["config"]
            assert cfg["seed"] == r["seed"]
    assert result["mean_diff"] == pytest.approx(
        sum(r["diff"] for r in result["seeds"]) / 2, abs=1e-4)
    # a second call reuses the finished runs instead of refusing to overwrite them
    assert run(tiny_world, tiny_harvest, [0], tmp_path / "work", params)["seeds"][0] == \
        result["seeds"][0]


def test_colour_confusion_counts_same_palette_items_of_other_styles(tiny_world):
    import pandas as pd

    from bench.debias_seeds import StyleTruth
    from pipelines.evaluate import load_rater_set

    rater = load_rater_set(tiny_world)
    products = pd.read_parquet(tiny_world / "truth/products.parquet").set_index("product_id")
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    catalog = catalog.assign(cluster=catalog["product_id"].map(products["cluster_id"]))
    targets = pd.read_parquet(tiny_world / "truth/rater_queries.parquet").set_index(
        "rater_query_id")["target_product_id"]
    style = StyleTruth.load(tiny_world, rater)
    own_style = [sorted(rel)[:10] for rel in rater.relevant]
    assert style.colour_confusion(own_style) == 0.0
    # ten items each: other style and same palette count, other style and other palette do not
    mixed, expected = [], []
    for q in rater.query_ids:
        target = products.loc[targets[q]]
        other = catalog[catalog["cluster"] != target["cluster_id"]]
        same = other[other["palette"] == target["palette"]]["item_id"].tolist()[:5]
        rest = other[other["palette"] != target["palette"]]["item_id"].tolist()[:10 - len(same)]
        mixed.append(same + rest)
        expected.append(len(same) / 10)
    share = style.colour_confusion(mixed)
    assert share == pytest.approx(sum(expected) / len(expected))
    assert sum(expected) > 0  # the tiny world has such items, so the check is not vacuous


def _seed_row(seed, debiased, naive):
    return {"seed": seed, "debiased_recall_at_10": debiased, "naive_recall_at_10": naive,
            "gap": debiased - naive}


def test_seed_study_interval_over_seeds_and_its_degenerate_case(capsys):
    from scipy import stats

    from bench.seed_study import summarise

    rows = [_seed_row(0, 0.50, 0.40), _seed_row(1, 0.46, 0.44), _seed_row(2, 0.47, 0.48)]
    s = summarise(rows)
    gaps = [0.10, 0.02, -0.01]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(gaps) / 3, scale=stats.sem(gaps))
    assert s["gap_ci95_over_seeds"] == [round(lo, 4), round(hi, 4)]
    assert s["gap_mean"] == pytest.approx(0.0367, abs=1e-4) and s["debiased_ahead"] == "2/3"
    assert "warning" not in s
    same = summarise([_seed_row(1, 0.5, 0.45), _seed_row(2, 0.52, 0.47)])
    assert same["gap_ci95_over_seeds"] == [0.05, 0.05]  # not NaN
    assert "degenerate" in same["warning"] and "WARNING" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least two seeds"):
        summarise(rows[:1])
