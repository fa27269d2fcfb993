"""Evaluation: recall@K definition, exact retrieval, and the report, on world-truth embedders.

The embed_fns here are built from the tiny world's ground truth (one-hot product / style
cluster directions), so every expected number follows from the truth tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from models.export import export_files
from pipelines import evaluate as ev
from pipelines.embed import embed_fn_from_export


# --------------------------------------------------------------------------- world truth
class Truth:
    """Path -> product / cluster for catalog photos, rater queries and logged queries."""

    def __init__(self, world: Path):
        products = pd.read_parquet(world / "truth/products.parquet")
        catalog = pd.read_parquet(world / "tables/catalog.parquet")
        rater = pd.read_parquet(world / "tables/rater_queries.parquet").merge(
            pd.read_parquet(world / "truth/rater_queries.parquet"), on="rater_query_id")
        logged = pd.read_parquet(world / "truth/queries.parquet")
        self.catalog = catalog.merge(products[["product_id", "cluster_id"]], on="product_id")
        self.cluster_of = products.set_index("product_id")["cluster_id"]
        self.category_of = products.set_index("product_id")["category"]
        self.product_of = {
            **dict(zip(catalog["image_path"], catalog["product_id"], strict=True)),
            **dict(zip(rater["image_path"], rater["target_product_id"], strict=True)),
            **{f"images/queries/{q}.jpg": p for q, p in
               zip(logged["query_id"], logged["target_product_id"], strict=True)},
        }
        self.rater = rater
        self.held_clusters = set(rater["cluster_id"])
        self.p_index = {p: i for i, p in enumerate(sorted(products["product_id"]))}
        clusters = sorted(products["cluster_id"].unique())
        self.c_index = {c: len(self.p_index) + i for i, c in enumerate(clusters)}
        self.junk = len(self.p_index) + len(clusters)
        assert self.junk < 256

    def embed_fn(self, vector_of) -> ev.EmbedFn:
        """embed_fn from `vector_of(product_id, is_query) -> raw vector`, L2-normalised."""
        def embed(paths, boxes):
            is_query = boxes is not None
            out = np.stack([vector_of(self.product_of[p], is_query) for p in paths])
            return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
        return embed

    def onehot(self, *weighted: tuple[int, float]) -> np.ndarray:
        v = np.zeros(256)
        for i, w in weighted:
            v[i] += w
        return v


@pytest.fixture(scope="module")
def truth(tiny_world) -> Truth:
    return Truth(tiny_world)


def graded_oracle(t: Truth, noise: float = 0.0, seed: int = 0) -> ev.EmbedFn:
    """Same product closest, then same style cluster, then everything else (+ noise)."""
    rng = np.random.default_rng(seed)

    def vec(p, is_query):
        v = t.onehot((t.p_index[p], 2.0), (t.c_index[t.cluster_of[p]], 1.0))
        return v + rng.normal(0, noise, 256)
    return t.embed_fn(vec)


def product_then_junk(t: Truth) -> ev.EmbedFn:
    """Ranks the query's own product first, then items of clusters outside the rater set, and
    the same-style siblings last: recall@K(q) = min(n_product, K) / min(K, n_cluster)."""
    def vec(p, is_query):
        if is_query:
            return t.onehot((t.p_index[p], 1.0), (t.junk, 0.1))
        junk = 0.0 if t.cluster_of[p] in t.held_clusters else 1.0
        return t.onehot((t.p_index[p], 1.0), (t.junk, junk))
    return t.embed_fn(vec)


# --------------------------------------------------------------------------- metric
def test_recall_at_k_hand_computed_with_min_k_normalisation():
    ranked = [["a", "x", "b", "y", "c"], ["x", "y", "z", "e", "w"]]
    relevant = [{"a", "b", "c", "d"}, {"e"}]
    recall = ev.recall_at_k(ranked, relevant, ks=(1, 3, 5))
    # q1: top1 {a} -> 1/min(1,4); top3 {a,b} -> 2/3; top5 {a,b,c} -> 3/min(5,4) = 3/4
    # q2: relevant e at rank 4 -> 0, 0, 1/min(5,1) = 1
    np.testing.assert_allclose(recall[1], [1.0, 0.0])
    np.testing.assert_allclose(recall[3], [2 / 3, 0.0])
    np.testing.assert_allclose(recall[5], [0.75, 1.0])
    hit = ev.hit_at_k(ranked, relevant, ks=(1, 3, 5))
    np.testing.assert_allclose([hit[1].mean(), hit[3].mean(), hit[5].mean()], [0.5, 0.5, 1.0])
    per_cat = ev.per_category_mean(recall, ["lamp", "mug"])
    assert per_cat == {"lamp": {1: 1.0, 3: pytest.approx(2 / 3), 5: 0.75},
                       "mug": {1: 0.0, 3: 0.0, 5: 1.0}}
    # a list shorter than K is its whole top-K
    assert ev.recall_at_k([["a"]], [{"a", "b"}], ks=(10,))[10][0] == 0.5


def test_paired_bootstrap_ci_of_a_gap():
    from pipelines.evaluate import paired_bootstrap_ci

    a = np.array([0.2, 0.5, 0.9, 0.4] * 25)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    assert paired_bootstrap_ci(a + 0.1, a) == pytest.approx((0.1, 0.1))  # a constant shift
    rng = np.random.default_rng(0)
    b = np.clip(a + rng.normal(0, 0.2, len(a)), 0, 1)
    lo, hi = paired_bootstrap_ci(a, b)
    assert lo < float(np.mean(a - b)) < hi and hi - lo < 0.2
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_ci(a, a[:-1])


def test_recall_rejects_queries_without_relevant_items():
    with pytest.raises(ValueError, match="no relevant items"):
        ev.recall_at_k([["a"]], [set()], ks=(1,))
    with pytest.raises(ValueError, match="2 ranked lists but 1"):
        ev.recall_at_k([["a"], ["b"]], [{"a"}], ks=(1,))


# --------------------------------------------------------------------------- retrieval
def test_exact_search_returns_true_nearest_neighbours():
    rng = np.random.default_rng(3)
    cat = rng.normal(size=(700, 32))
    cat /= np.linalg.norm(cat, axis=1, keepdims=True)
    q = rng.normal(size=(25, 32))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, rows = ev.exact_search(cat, q, 10)
    sims = q @ cat.T
    np.testing.assert_array_equal(rows, np.argsort(-sims, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, rows, 1), atol=1e-5)
    assert ev.exact_search(cat[:4], q, 10)[1].shape == (25, 4)  # k capped at catalog size


def test_exact_search_rejects_non_unit_and_mismatched_vectors():
    cat = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="not unit length"):
        ev.exact_search(cat * 2, cat, 1)
    with pytest.raises(ValueError, match="4-d but queries 3-d"):
        ev.exact_search(cat, np.eye(3, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        ev.exact_search(cat, np.full((1, 4), np.nan, np.float32), 1)


# --------------------------------------------------------------------------- eval sets
def test_rater_set_matches_world_judgments(tiny_world, truth):
    rater = ev.load_rater_set(tiny_world)
    assert len(rater.query_ids) == len(truth.rater)
    row = truth.rater.set_index("rater_query_id").loc[rater.query_ids[0]]
    same_cluster = truth.catalog[truth.catalog["cluster_id"] == row["cluster_id"]]
    assert set(rater.relevant[0]) == set(same_cluster["item_id"])
    same_product = same_cluster[same_cluster["product_id"] == row["target_product_id"]]
    assert {i for i, g in rater.relevant[0].items() if g == 2} == set(same_product["item_id"])


def test_engagement_set_file_is_validated(tmp_path):
    bad = tmp_path / "eval_engagement.parquet"
    pd.DataFrame({"query_image_path": ["images/queries/q0.jpg"], "item_ids": [["it1"]]}
                 ).to_parquet(bad)
    with pytest.raises(ValueError, match="missing columns"):
        ev.load_engagement_set(bad)
    with pytest.raises(FileNotFoundError, match="table not found"):
        ev.load_engagement_set(tmp_path / "absent.parquet")


def _engagement_file(world: Path, truth: Truth, path: Path, n: int = 30) -> Path:
    """Logged queries with their target product's listings as the engaged items."""
    logged = pd.read_parquet(world / "truth/queries.parquet").sort_values("query_id").head(n)
    items = truth.catalog.groupby("product_id")["item_id"].apply(sorted)
    pd.DataFrame({
        "query_image_path": [f"images/queries/{q}.jpg" for q in logged["query_id"]],
        "query_x0": 0.0, "query_y0": 0.0, "query_x1": 1.0, "query_y1": 1.0,
        "item_ids": [items[p] for p in logged["target_product_id"]],
        "category": [truth.category_of[p] for p in logged["target_product_id"]],
    }).to_parquet(path, index=False)
    return path


# --------------------------------------------------------------------------- evaluation
def test_evaluate_models_numbers_follow_from_truth(tiny_world, truth, tmp_path):
    sets = [ev.load_rater_set(tiny_world),
            ev.load_engagement_set(_engagement_file(tiny_world, truth, tmp_path / "e.parquet"))]
    wrong = {"lamp", "mug"}

    def wrong_style(p, is_query):
        """Right for most categories; lamp and mug queries land on another cluster, then on
        out-of-set clusters (junk), so their own cluster is outside even the top 50."""
        if is_query and truth.category_of[p] in wrong:
            others = truth.cluster_of[(truth.category_of == truth.category_of[p])
                                      & (truth.cluster_of != truth.cluster_of[p])]
            return truth.onehot((truth.c_index[others.iloc[0]], 1.0), (truth.junk, 0.1))
        junk = 0.0 if is_query or truth.cluster_of[p] in truth.held_clusters else 1.0
        return truth.onehot((truth.c_index[truth.cluster_of[p]], 1.0), (truth.junk, junk))

    report = ev.evaluate_models(
        {"model": graded_oracle(truth, noise=0.02), "junk": product_then_junk(truth),
         "wrong": truth.embed_fn(wrong_style)}, tiny_world, sets)

    oracle = report.models["model"].sets
    for name in ("rater", "engagement"):
        assert oracle[name].recall == {k: 1.0 for k in ev.KS}
    assert report.headline == 1.0

    # product first, then out-of-set clusters: min(n_product, K) / min(K, n_cluster)
    n_prod = truth.catalog["product_id"].value_counts()
    n_clus = truth.catalog["cluster_id"].value_counts()
    r = truth.rater.set_index("rater_query_id").loc[sets[0].query_ids]
    junk = report.models["junk"].sets["rater"]
    for k in ev.KS:
        expected = (np.minimum(n_prod[r["target_product_id"]].to_numpy(), k)
                    / np.minimum(k, n_clus[r["cluster_id"]].to_numpy()))
        np.testing.assert_allclose(junk.query_recall[k], expected)
        assert junk.recall[k] == pytest.approx(expected.mean())
        assert junk.hit[k] == 1.0
    assert 0 < junk.recall[50] < junk.recall[1] == 1.0

    # per category: the two broken categories score 0, the rest 1
    w = report.models["wrong"].sets["rater"]
    cats = np.array(sets[0].categories)
    assert w.per_category == {c: {k: 0.0 if c in wrong else 1.0 for k in ev.KS}
                              for c in sorted(set(cats))}
    assert w.recall[10] == pytest.approx(np.mean(~np.isin(cats, list(wrong))))

    flat = report.flat_metrics()
    assert flat["rater_recall_at_10"] == 1.0
    assert flat["junk/rater/recall_at_50"] == pytest.approx(junk.recall[50])
    assert flat["wrong/rater/lamp/recall_at_10"] == 0.0
    assert flat["wrong/engagement/hit_at_1"] == report.models["wrong"].sets["engagement"].hit[1]


def test_evaluate_rejects_bad_embedders_and_sets(tiny_world, truth):
    rater = ev.load_rater_set(tiny_world)
    with pytest.raises(ValueError, match="not unit length"):
        ev.evaluate_models({"model": lambda p, b: np.ones((len(p), 8), np.float32)},
                           tiny_world, [rater])
    with pytest.raises(ValueError, match=r"expected \(\d+, d\) embeddings"):
        ev.evaluate_models({"model": lambda p, b: np.eye(8, dtype=np.float32)[:1]},
                           tiny_world, [rater])
    with pytest.raises(ValueError, match="candidate 'model' is not among"):
        ev.evaluate_models({"other": graded_oracle(truth)}, tiny_world, [rater])
    ghost = ev.EvalSet("rater", ["q"], [rater.query_paths[0]], np.array([[0, 0, 1, 1.0]]),
                       ["lamp"], [{"it9999999": 1}])
    with pytest.raises(ValueError, match="missing from the catalog"):
        ev.evaluate_models({"model": graded_oracle(truth)}, tiny_world, [ghost])
    with pytest.raises(ValueError, match="no relevant items"):
        ev.EvalSet("rater", ["q"], ["x.jpg"], np.zeros((1, 4)), ["lamp"], [{}])


def test_report_leads_with_the_verdict_and_shows_what_a_reviewer_decides_with(
        tiny_world, truth, tmp_path):
    rater = ev.load_rater_set(tiny_world)
    report = ev.evaluate_models({"model": product_then_junk(truth),
                                 ev.CHAMPION_LABEL: graded_oracle(truth, noise=0.5),
                                 ev.FROZEN_BASELINE: graded_oracle(truth, noise=0.9, seed=1)},
                                tiny_world, [rater])
    report.champion_version = "loupe-embedder/7"
    verdict = ev.gate_verdict(report, margin=0.01, applied=False)
    paths = ev.write_reports(report, [rater], tiny_world, tmp_path / "reports",
                             n_report_queries=20, verdict=verdict)
    page = paths["html"].read_text()
    ours = np.array(report.models["model"].sets["rater"].query_recall[10])
    champ = np.array(report.models[ev.CHAMPION_LABEL].sets["rater"].query_recall[10])
    # the decision and its reason come first, before any table
    assert page.index("id='decision'") < page.index("<table")
    assert verdict.promote == (ours.mean() - champ.mean() >= 0.01)
    assert f"{ours.mean():.4f} vs champion {champ.mean():.4f}" in page
    assert "advisory" in page and "loupe-embedder/7" in page or verdict.promote
    # per category: every model's mean recall@10 with a bootstrap CI around it
    rows = {r["category"]: r for r in ev.category_recall(report, rater)}
    cats = np.array(rater.categories)
    assert set(rows) == set(cats) | {"all"}
    for cat, row in rows.items():
        mask = np.ones(len(cats), bool) if cat == "all" else cats == cat
        assert row["n_queries"] == mask.sum()
        cell = row["models"]["model"]
        assert cell["recall"] == pytest.approx(ours[mask].mean())
        if mask.sum() >= 2:
            assert cell["ci95"][0] <= cell["recall"] <= cell["ci95"][1]
        assert row["gap"]["vs"] == ev.CHAMPION_LABEL
        assert row["gap"]["diff"] == pytest.approx((ours - champ)[mask].mean())
    assert page.count("<tr><td>", page.index("id='categories'")) >= len(rows)
    # query by query against the champion: counts, largest changes first, both grids
    improved, regressed = ev.changed_queries(report, rater, ev.CHAMPION_LABEL)
    assert len(improved) == (ours > champ).sum() and len(regressed) == (ours < champ).sum()
    assert 0 < len(improved) and 0 < len(regressed)
    gains = (ours - champ)[improved]
    assert np.all(np.diff(gains) <= 0) and np.all(np.diff((ours - champ)[regressed]) >= 0)
    assert f"{len(improved)} improved" in page and f"{len(regressed)} regressed" in page
    shown = min(len(improved), ev.N_CHANGED) + min(len(regressed), ev.N_CHANGED)
    assert page.count("<div class='pair ") == shown
    # the worst 20 queries, lowest recall first, hits green and misses red
    worst = ev.worst_queries(report, rater, 20)
    assert list(ours[worst]) == sorted(ours[worst]) and ours[worst][-1] <= np.sort(ours)[19]
    tail = page[page.index("id='worst'"):]
    assert re.findall(r"class='worst'><div class='grid' data-query='([^']+)'", tail) == [
        rater.query_ids[i] for i in worst]
    top = report.models["model"].sets["rater"].top_items
    hits = sum(sum(item in rater.relevant[i] for item in top[i]) for i in worst)
    assert tail.count("class='hit'") == hits
    assert tail.count("class='miss'") == 20 * ev.REPORT_TOP - hits
    assert page.count("class='grid'") == 20 + 2 * shown
    assert not re.search(r"src='(?!data:)", page)  # self-contained
    # the sortable per-query table logged with mlflow.log_table
    table = pd.read_csv(paths["per_query"])
    assert len(table) == len(rater.query_ids)
    np.testing.assert_allclose(table["delta_vs_champion"], ours - champ)
    summary = paths["summary"].read_text()
    assert '"fingerprint": "' + report.fingerprint in summary and '"gate": {' in summary


def test_publish_logs_metrics_artifacts_and_registers_the_model(tiny_world, truth, exports,
                                                                 tmp_path):
    from mlflow import MlflowClient

    from pipelines import registry as reg
    from pipelines.registry import RegistryConfig

    sets = [ev.load_rater_set(tiny_world),
            ev.load_engagement_set(_engagement_file(tiny_world, truth, tmp_path / "e.parquet"))]
    report = ev.evaluate_models({ev.CANDIDATE: graded_oracle(truth, noise=0.02),
                                 ev.FROZEN_BASELINE: graded_oracle(truth, noise=0.6),
                                 ev.NAIVE: product_then_junk(truth)}, tiny_world, sets)
    propensity = tmp_path / "propensity.png"
    Image.new("RGB", (60, 40), "white").save(propensity)
    cfg = RegistryConfig(f"sqlite:///{tmp_path}/mlflow.db")
    out = ev.publish(report, sets, tiny_world, tmp_path / "reports", cfg, exports["a"],
                     params={"backbone": "oracle"}, propensity_png=propensity, promote=True)

    client = MlflowClient(cfg.uri, cfg.uri)
    run = client.get_run(out.run_id)
    assert run.data.metrics == pytest.approx(report.flat_metrics())
    assert run.data.metrics["frozen_pretrained/rater/recall_at_10"] < 1.0
    assert run.data.metrics["naive_click/rater/recall_at_50"] == pytest.approx(
        report.models[ev.NAIVE].sets["rater"].recall[50])
    assert run.data.params["backbone"] == "oracle"
    assert run.data.params["n_queries_engagement"] == "30"
    listed = {a.path for d in (None, "plots", "report", "model", "promotion")
              for a in client.list_artifacts(out.run_id, d)}
    assert {"plots/recall_at_k.png", "plots/recall_at_k.csv", "plots/propensity.png",
            "report/eval_report.html", "report/eval_summary.json", "report/per_query.csv",
            "per_query_rater.json", "model/MLmodel",
            "model/artifacts", "model/input_example.json", "promotion/decision.json"} <= listed
    # a table MLflow knows (what `load_table` finds by this tag), read through this client:
    # load_table itself goes through the process-global fluent store, and setting that
    # (mlflow.set_tracking_uri) leaks into every later test
    assert {"path": "per_query_rater.json", "type": "table"} in json.loads(
        run.data.tags["mlflow.loggedArtifacts"])
    raw = json.loads(Path(client.download_artifacts(out.run_id, "per_query_rater.json",
                                                    str(tmp_path))).read_text())
    table = pd.DataFrame(raw["data"], columns=raw["columns"])
    assert len(table) == len(sets[0].query_ids) and {"query_id", "category", "model_recall_at_10",
                                 "delta_vs_frozen_pretrained"} <= set(table.columns)
    assert run.data.tags["gate.verdict"] == "promote"  # no champion yet
    assert out.model_version == run.data.tags["model_version"] == "loupe-embedder/1"
    assert out.decision["promoted"] and out.decision["challenger_recall"] == 1.0
    mv = client.get_model_version_by_alias("loupe-embedder", "champion")
    assert str(mv.version) == "1" and mv.tags["eval_fingerprint"] == report.fingerprint
    # an MLflow model: the champion loads by alias as a pyfunc, with its signature, and
    # answers what the export (the graph Triton runs) answers
    import mlflow.pyfunc

    from models.export import ExportedEmbedder

    mlflow.set_registry_uri(cfg.uri)
    try:
        champion = mlflow.pyfunc.load_model("models:/loupe-embedder@champion")
    finally:
        mlflow.set_registry_uri(None)
    inputs = champion.metadata.get_input_schema().inputs[0]
    assert (inputs.type, inputs.shape) == (np.dtype("float32"), (-1, 3, 128, 128))
    pixels = np.random.default_rng(0).random((3, 3, 128, 128), dtype=np.float32)
    np.testing.assert_allclose(champion.predict(pixels), ExportedEmbedder(exports["a"])(pixels),
                               atol=1e-6)
    assert reg.download_model(cfg, "loupe-embedder/1", tmp_path / "dl").name == "export"


def test_evaluate_cli_rejects_bad_arguments_readably(tiny_world, tmp_path, capsys):
    from pipelines import cli

    base = ["evaluate", "--world", str(tiny_world), "--model", str(tmp_path / "absent")]
    assert cli.main([*base, "--baseline", "naive.ts"]) == 2
    assert "--baseline must be LABEL=PATH" in capsys.readouterr().err
    assert cli.main([*base, "--baseline", f"{ev.CANDIDATE}=x.ts"]) == 2
    assert "labels the candidate" in capsys.readouterr().err
    assert cli.main(base) == 2
    assert "exported embedder incomplete" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  ks: [1, 10]\n  top_k: 3\n")
    assert cli.main([*base, "--params", str(params)]) == 2
    assert "unknown evaluate params ['top_k']" in capsys.readouterr().err
    params.write_text("evaluate:\n  ks: [1, 10]\n  promotion_margin: 0.05\n")
    assert ev.EvaluateConfig.load(params) == ev.EvaluateConfig(ks=(1, 10), promotion_margin=0.05)


# --------------------------------------------------------------------------- run_evaluate
@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Two real exports: frozen baselines with different projection seeds."""
    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder

    base = tmp_path_factory.mktemp("exports")
    return {name: export_embedder(frozen_baseline(EmbedderSpec(seed=seed)), base / name)
            for name, seed in (("a", 0), ("b", 1))}


def _train_json(path: Path, pairs: Path | None = None) -> Path:
    path.write_text((f'{{"pairs": "{pairs}", ' if pairs else '{') +
                    f'"mlflow_run_id": "{"f" * 32}", '
                    '"train_seconds": 12.5, "best_val_style_recall_at_10": 0.4, '
                    '"config": {"seed": 0, "lr": 0.0005}, "versions": {"torch": "2.13.0"}, '
                    '"curve": [{"epoch": 0, "train_loss": 3.1, "val_style_recall_at_10": 0.3},'
                    ' {"epoch": 1, "train_loss": 2.9, "val_style_recall_at_10": 0.4}]}')
    return path


def test_cli_and_retrain_task_log_runs_of_the_same_shape(tiny_world, truth, exports, tmp_path):
    """`loupe evaluate` and the retrain DAG's evaluate task both go through run_evaluate: the
    MLflow runs have the same params and metrics keys."""
    from mlflow import MlflowClient

    from pipelines import cli

    engagement = _engagement_file(tiny_world, truth, tmp_path / "e.parquet")
    train_json = _train_json(tmp_path / "train.json", pairs=engagement)
    cli_uri = f"sqlite:///{tmp_path}/cli.db"
    assert cli.main(["evaluate", "--world", str(tiny_world), "--model", str(exports["a"]),
                     "--baseline", f"{ev.NAIVE}={exports['b']}", "--engagement",
                     str(engagement), "--train-json", str(train_json), "--out",
                     str(tmp_path / "cli"), "--metrics", str(tmp_path / "cli.json"),
                     "--tracking-uri", cli_uri]) == 0
    task_uri = f"sqlite:///{tmp_path}/task.db"
    done = ev.run_evaluate(ev.EvaluateConfig(), tiny_world, exports["a"],
                           {ev.NAIVE: exports["b"]}, tmp_path / "task",
                           engagement=engagement, metrics_path=tmp_path / "task.json",
                           train_json=train_json, tracking_uri=task_uri, promote=True)
    runs = []
    for uri in (cli_uri, task_uri):
        client = MlflowClient(uri, uri)
        exp = client.get_experiment_by_name("loupe-embedder")
        (run,) = client.search_runs([exp.experiment_id])
        runs.append((client, run))
    (c1, r1), (c2, r2) = runs
    assert set(r1.data.params) == set(r2.data.params)
    assert set(r1.data.metrics) == set(r2.data.metrics)
    def scores(run):  # same models, same numbers; wall-clock timings differ run to run
        return {k: v for k, v in run.data.metrics.items() if not k.endswith("_seconds")}

    assert scores(r1) == pytest.approx(scores(r2))
    assert r1.data.params["versions.torch"].startswith("2.13.0")
    assert r1.data.params["train_versions.torch"] == "2.13.0"
    # the curves live on the training run (another store here): the link is still recorded
    assert r1.data.tags["training_run_id"] == r2.data.tags["training_run_id"] == "f" * 32
    assert (tmp_path / "cli.json").read_text() == (tmp_path / "task.json").read_text()
    assert done.published.decision["promoted"]
    # data lineage: the same tables, the same digests, on both runs
    from pipelines.registry import file_digest

    def lineage(run):
        return {(d.dataset.name, d.dataset.digest, d.tags[0].value)
                for d in run.inputs.dataset_inputs}

    assert lineage(r1) == lineage(r2) == {
        ("catalog", file_digest(tiny_world / "tables" / "catalog.parquet"), "evaluation"),
        ("rater_queries", file_digest(tiny_world / "tables" / "rater_queries.parquet"),
         "evaluation"),
        ("rater_judgments", file_digest(tiny_world / "tables" / "rater_judgments.parquet"),
         "evaluation"),
        ("engagement_eval", file_digest(engagement), "evaluation"),
        ("training_pairs", file_digest(engagement), "training")}
    # the CLI registers a challenger only: `loupe promote VERSION --reason` moves champion
    assert "champion" not in c1.get_registered_model("loupe-embedder").aliases
    assert str(c1.get_registered_model("loupe-embedder").aliases["challenger"]) == "1"


def test_gate_rescores_a_champion_from_another_eval_set(tiny_world, exports, tmp_path):
    """A champion scored on another world's set is re-evaluated on this one (not refused),
    so the gate compares numbers from the same set and a new world can replace it."""
    from pipelines import registry as reg

    cfg = reg.RegistryConfig(f"sqlite:///{tmp_path}/mlflow.db")
    run = reg.log_run(cfg, run_name="other-world", params={}, metrics={}, artifacts={},
                      model_files=export_files(exports["b"]))
    other = reg.register_model_version(cfg, run, 0.99, "fp-of-another-world")
    assert reg.promotion_gate(cfg, other).promoted  # the first version: champion
    expected = ev.evaluate_models({ev.CANDIDATE: embed_fn_from_export(exports["b"],
                                                                        tiny_world)},
                                  tiny_world, [ev.load_rater_set(tiny_world)]).headline
    assert expected < 0.99  # its recorded figure does not hold on this world
    done = ev.run_evaluate(ev.EvaluateConfig(promotion_margin=0.0), tiny_world, exports["a"],
                           {}, tmp_path / "eval", tracking_uri=cfg.tracking_uri, promote=True)
    decision = done.published.decision
    assert decision["champion"] == other.model_version
    assert decision["champion_recall"] == pytest.approx(expected)
    assert "re-evaluated on this set" in decision["reason"]
    assert decision["challenger_recall"] == pytest.approx(done.report.headline)
    assert decision["challenger_recall"] != pytest.approx(expected)  # two different models
    assert decision["promoted"] == (decision["challenger_recall"] > expected)
    champion = reg.version_for_alias(cfg, reg.CHAMPION)
    assert champion.model_version == (done.published.model_version if decision["promoted"]
                                      else other.model_version)
