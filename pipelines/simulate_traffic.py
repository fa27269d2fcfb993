"""Simulated users for online tests: the world's behaviour model clicking on served grids.

It exists to exercise the loop end to end (serve -> log -> analyse -> harvest -> train), not
to decide launches. A user wants one product (drawn by popularity), sends its query photo,
examines grid position k with probability k^-0.7, clicks an examined item with its
attractiveness (true relevance scaled by popularity) and saves some clicks: the world's own
behaviour model (`pipelines.world.behaviour`), so served logs look like the world's.

Two drivers share that behaviour:
- `drive_api`: real HTTP-shaped traffic against a front door (serving/api/online.py):
  `POST /v1/search`, then `POST /v1/events` for every click and save.
- `session_study`: the session-count study, in process. Its rankers are **truth-based
  rankers with controlled noise** (true relevance + Gaussian noise; the world's logging
  ranker uses sigma 0.25), not the trained embedder: the champion has sigma 0.25, the
  deliberately worse challenger a larger sigma. For many replicated experiments it finds
  how many sessions A/B (50/50 user split, CTR delta-method z-test) and team-draft
  interleaving (sign test) need to reach p < 0.05 in favour of the champion with 80 % power.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from data_contracts.constants import GRID_SIZE
from data_contracts.durable import write_text_atomic
from pipelines import online_eval
from pipelines.world.behaviour import (
    STYLE_ATTRIBUTES,
    LoggingPolicy,
    relevance,
    respond,
    wanted_product,
)
from serving.api.experiments import TEAM_A, TEAM_B, ExperimentConfig, assign_arm, team_draft


@dataclass
class BehaviourWorld:
    """A world's catalog and truth as arrays: relevance of any item to any wanted product."""

    item_ids: np.ndarray  # str, catalog order
    item_product: np.ndarray  # product index per item
    product_ids: np.ndarray
    product_truth: np.ndarray  # (products, TRUTH_COLUMNS) int codes: index, cluster, style
    product_category: np.ndarray  # int codes
    popularity: np.ndarray  # per product
    pool: dict[int, np.ndarray]  # category code -> item indices (the ranker's candidates)
    queries: pd.DataFrame  # query_id, query_image_path, user_id, target (product index)

    @classmethod
    def load(cls, world: Path) -> BehaviourWorld:
        world = Path(world)
        catalog = pd.read_parquet(world / "tables/catalog.parquet")
        products = pd.read_parquet(world / "truth/products.parquet").reset_index(drop=True)
        index = pd.Series(np.arange(len(products)), index=products["product_id"])
        truth = np.stack([np.arange(len(products)), pd.factorize(products["cluster_id"])[0],
                          *(pd.factorize(products[a])[0] for a in STYLE_ATTRIBUTES)], axis=1)
        category = pd.factorize(products["category"])[0]
        item_product = index.loc[catalog["product_id"]].to_numpy()
        item_category = category[item_product]
        queries = pd.read_parquet(world / "tables/impressions.parquet",
                                  columns=["query_id", "query_image_path", "user_id"]
                                  ).drop_duplicates("query_id")
        targets = pd.read_parquet(world / "truth/queries.parquet")
        queries = queries.merge(targets, on="query_id", validate="one_to_one")
        queries["target"] = index.loc[queries.pop("target_product_id")].to_numpy()
        return cls(catalog["item_id"].to_numpy(), item_product,
                   products["product_id"].to_numpy(), truth, category,
                   products["popularity"].to_numpy(),
                   {int(c): np.flatnonzero(item_category == c) for c in np.unique(category)},
                   queries.reset_index(drop=True))

    def relevance(self, target: int, items: np.ndarray) -> np.ndarray:
        """True graded relevance of items (catalog indices) to a wanted product (index)."""
        return relevance(self.product_truth[target], self.product_truth[self.item_product[items]])

    def draw_target(self, rng: np.random.Generator) -> int:
        return wanted_product(self.popularity, rng)


def user_response(world: BehaviourWorld, target: int, shown: np.ndarray,
                  rng: np.random.Generator, activity: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(clicked, saved) per grid position of a user wanting `target` and shown the catalog
    indices `shown` (`pipelines.world.behaviour.respond`)."""
    return respond(world.relevance(target, shown), world.popularity[world.item_product[shown]],
                   rng, activity=activity)


@dataclass(frozen=True)
class TruthRanker:
    """Ranks the wanted product's category by true relevance + N(0, noise^2)."""

    world: BehaviourWorld
    noise: float
    seed: int

    def rank(self, target: int, k: int, query_key: str) -> np.ndarray:
        """Top-k item indices; the noise is fixed per (ranker seed, query)."""
        pool = self.world.pool[int(self.world.product_category[target])]
        rng = np.random.default_rng([self.seed, int(hashlib.sha256(
            query_key.encode()).hexdigest()[:12], 16)])
        score = self.world.relevance(target, pool) + rng.normal(0, self.noise, len(pool))
        top = np.argpartition(-score, min(k, len(pool) - 1))[:k]
        return pool[top[np.argsort(-score[top])]]


def image_rank_fn(world_root: Path, ranker: TruthRanker
                  ) -> Callable[[bytes, int], list[tuple[str, float]]]:
    """(query photo bytes, k) -> [(item_id, score)]: a truth ranker behind the search
    interface. It knows the world's query photos only (by content hash)."""
    by_digest = {hashlib.sha256((Path(world_root) / p).read_bytes()).hexdigest(): int(t)
                 for p, t in zip(ranker.world.queries["query_image_path"],
                                 ranker.world.queries["target"], strict=True)}

    def rank(image: bytes, k: int) -> list[tuple[str, float]]:
        digest = hashlib.sha256(image).hexdigest()
        if digest not in by_digest:
            raise ValueError("the truth ranker knows only the world's query photos")
        items = ranker.rank(by_digest[digest], k, digest)
        return [(str(ranker.world.item_ids[i]), float(GRID_SIZE - r)) for r, i in enumerate(items)]

    return rank


# --------------------------------------------------------------------------- live API
@dataclass
class TrafficSummary:
    sessions: int
    clicks: int
    saves: int
    by_arm: dict[str, int]
    rejected_events: int
    seconds: float


def drive_api(client: httpx.Client, world_root: Path, n_sessions: int, seed: int = 0,
              world: BehaviourWorld | None = None) -> TrafficSummary:
    """Send `n_sessions` world queries to a front door and click/save like its users."""
    world = world or BehaviourWorld.load(world_root)
    rng = np.random.default_rng([seed, 7])
    item_index = {str(i): n for n, i in enumerate(world.item_ids)}
    t0 = time.perf_counter()
    clicks = saves = rejected = 0
    by_arm: dict[str, int] = {}
    for _ in range(n_sessions):
        q = world.queries.iloc[int(rng.integers(0, len(world.queries)))]
        image = (Path(world_root) / q["query_image_path"]).read_bytes()
        r = client.post("/v1/search", data={"user_id": q["user_id"], "k": str(GRID_SIZE)},
                        files={"image": ("q.jpg", image, "image/jpeg")})
        r.raise_for_status()
        body = r.json()
        by_arm[body["arm"]] = by_arm.get(body["arm"], 0) + 1
        shown = np.array([item_index[it["item_id"]] for it in body["items"]])
        clicked, saved = user_response(world, int(q["target"]), shown, rng)
        for pos in np.flatnonzero(clicked):
            for kind in ("click", "save") if saved[pos] else ("click",):
                e = client.post("/v1/events", json={
                    "request_id": body["request_id"], "position": int(pos) + 1,
                    "item_id": body["items"][pos]["item_id"], "type": kind})
                if e.status_code == 201:
                    clicks += kind == "click"
                    saves += kind == "save"
                else:
                    rejected += 1
    return TrafficSummary(n_sessions, clicks, saves, by_arm, rejected,
                          round(time.perf_counter() - t0, 2))


# --------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class StudyConfig:
    champion_noise: float = LoggingPolicy.relevance_noise  # the world's logging ranker
    challenger_noise: float = 0.3  # deliberately worse: 20 % more ranking noise
    max_sessions: int = 8000
    replications: int = 40
    # coefficient of variation of a per-user activity factor (Gamma, mean 1) scaling
    # examination; 0 = the world's logs, where every user examines alike
    user_activity_cv: float = 0.0
    power: float = 0.8
    alpha: float = 0.05
    seed: int = 0


def _checkpoints(max_sessions: int) -> np.ndarray:
    """Session counts the p-values are read at: ~8 % steps from 20 to max_sessions."""
    points = np.unique(np.round(np.geomspace(20, max_sessions, 90)).astype(int))
    return points[points <= max_sessions]


def _activity(cfg: StudyConfig, rng: np.random.Generator) -> float:
    """A session's user activity: Gamma with mean 1 and the configured CV (no draw at 0, so
    the homogeneous study replays exactly)."""
    if cfg.user_activity_cv <= 0:
        return 1.0
    shape = 1.0 / cfg.user_activity_cv**2
    return float(rng.gamma(shape, 1.0 / shape))


def _one_replication(world: BehaviourWorld, cfg: StudyConfig, rep: int, champion: TruthRanker,
                     challenger: TruthRanker) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A/B: per session (is_challenger, clicks); interleaving: per session winner (+1 champion,
    -1 challenger, 0 tie). Both experiments see fresh, independent sessions."""
    ab_cfg = ExperimentConfig("study", f"study-{cfg.seed}-{rep}",
                              {"champion": 0.5, "challenger": 0.5})
    rng_ab = np.random.default_rng([cfg.seed, rep, 1])
    rng_il = np.random.default_rng([cfg.seed, rep, 2])
    is_challenger = np.zeros(cfg.max_sessions, bool)
    ab_clicks = np.zeros(cfg.max_sessions)
    il_winner = np.zeros(cfg.max_sessions, np.int8)
    for s in range(cfg.max_sessions):
        target = world.draw_target(rng_ab)
        is_challenger[s] = assign_arm(ab_cfg, f"r{rep}u{s}") == "challenger"
        ranker = challenger if is_challenger[s] else champion
        shown = ranker.rank(target, GRID_SIZE, f"ab{rep}-{s}")
        ab_clicks[s] = user_response(world, target, shown, rng_ab,
                                     _activity(cfg, rng_ab))[0].sum()

        target = world.draw_target(rng_il)
        key = f"il{rep}-{s}"
        a, b = champion.rank(target, GRID_SIZE, key), challenger.rank(target, GRID_SIZE, key)
        drafted = team_draft(a.tolist(), b.tolist(), GRID_SIZE, lambda: rng_il.random() < 0.5)
        shown = np.array([i for i, _ in drafted])
        teams = np.array([t for _, t in drafted])
        clicked = user_response(world, target, shown, rng_il, _activity(cfg, rng_il))[0]
        wa, wb = (clicked & (teams == TEAM_A)).sum(), (clicked & (teams == TEAM_B)).sum()
        il_winner[s] = np.sign(wa - wb)
    return is_challenger, ab_clicks, il_winner


def _ab_p_values(is_challenger: np.ndarray, clicks: np.ndarray, points: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(p, champion better?) of the CTR test on each prefix; one user per session, 20
    impressions per grid, so the delta method reduces to per-session click counts."""
    p = np.ones(len(points))
    champion_better = np.zeros(len(points), bool)
    for j, n in enumerate(points):
        est = []
        for arm in (False, True):
            y = clicks[:n][is_challenger[:n] == arm]
            if len(y) < 2:
                break
            est.append(online_eval.ratio_estimate(y, np.full(len(y), GRID_SIZE)))
        if len(est) == 2:
            c = online_eval.compare(est[0], est[1])
            p[j], champion_better[j] = c.p_value, c.diff < 0
    return p, champion_better


def _il_p_values(winner: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    wins_a, wins_b = np.cumsum(winner == 1), np.cumsum(winner == -1)
    tests = [online_eval.sign_test(int(wins_a[n - 1]), int(wins_b[n - 1])) for n in points]
    return (np.array([t.p_value for t in tests]),
            np.array([t.preference_a > 0.5 for t in tests]))


def _sessions_needed(significant: np.ndarray, points: np.ndarray, power: float) -> int | None:
    """Smallest checkpoint where at least `power` of the replications are significant."""
    hit = np.flatnonzero(significant.mean(axis=0) >= power)
    return int(points[hit[0]]) if len(hit) else None


def _power_study(world: BehaviourWorld, cfg: StudyConfig) -> dict:
    """Replicate both experiments; power per checkpoint and the sessions each needs."""
    champion = TruthRanker(world, cfg.champion_noise, cfg.seed * 2 + 1)
    challenger = TruthRanker(world, cfg.challenger_noise, cfg.seed * 2 + 2)
    points = _checkpoints(cfg.max_sessions)
    ab_sig, il_sig, ab_wrong, il_wrong = [], [], [], []
    last: dict = {}
    for rep in range(cfg.replications):
        is_challenger, ab_clicks, il_winner = _one_replication(world, cfg, rep, champion,
                                                               challenger)
        p, right = _ab_p_values(is_challenger, ab_clicks, points)
        ab_sig.append((p < cfg.alpha) & right)
        ab_wrong.append(bool(((p < cfg.alpha) & ~right)[-1]))
        p, right = _il_p_values(il_winner, points)
        il_sig.append((p < cfg.alpha) & right)
        il_wrong.append(bool(((p < cfg.alpha) & ~right)[-1]))
        last = {"is_challenger": is_challenger, "clicks": ab_clicks, "winner": il_winner}
    ab_needed = _sessions_needed(np.array(ab_sig), points, cfg.power)
    il_needed = _sessions_needed(np.array(il_sig), points, cfg.power)
    example = _full_run_analysis(last, cfg)
    return {
        "challenger_noise_sigma": cfg.challenger_noise,
        "ab_sessions_needed": ab_needed, "interleaving_sessions_needed": il_needed,
        "ratio_ab_over_interleaving": (round(ab_needed / il_needed, 2)
                                       if ab_needed and il_needed else None),
        "ctr_relative_diff_full_run": round(example["ab"]["tests"]["ctr"]["relative"], 4),
        "interleaving_preference_full_run": round(
            example["interleaving"]["preference_a"], 4),
        "replications_preferring_challenger_significantly": {
            "ab": int(sum(ab_wrong)), "interleaving": int(sum(il_wrong))},
        "power_curve": {"sessions": points.tolist(),
                        "ab": np.array(ab_sig).mean(axis=0).round(3).tolist(),
                        "interleaving": np.array(il_sig).mean(axis=0).round(3).tolist()},
        "example_full_run": example,
    }


def session_study(world_root: Path, cfg: StudyConfig,
                  sensitivity_noises: tuple[float, ...] = (),
                  activity_cvs: tuple[float, ...] = ()) -> dict:
    """Sessions each method needs to prefer the champion at p < alpha with `power`, for
    the configured challenger and (smaller tables) for other challenger noise levels and
    for users who differ in activity. Interleaving's edge over A/B comes from comparing
    both rankers within one user, which cancels between-user variance: the activity rows
    show how much of it the verdict depends on."""
    t0 = time.perf_counter()
    world = BehaviourWorld.load(world_root)
    head = _power_study(world, cfg)

    def row(study: StudyConfig) -> dict:
        out = _power_study(world, study)
        return {"user_activity_cv": study.user_activity_cv,
                **{k: v for k, v in out.items() if k not in ("power_curve",
                                                             "example_full_run")}}

    rows = [row(replace(cfg, challenger_noise=noise)) for noise in sensitivity_noises]
    activity_rows = [row(replace(cfg, user_activity_cv=cv)) for cv in activity_cvs]
    example = head["example_full_run"]
    return {
        "ab_sessions_needed": head["ab_sessions_needed"],
        "interleaving_sessions_needed": head["interleaving_sessions_needed"],
        "winner": example["winner"],
        "verdict_full_run": example["verdict"],
        "ratio_ab_over_interleaving": head["ratio_ab_over_interleaving"],
        "definition": (f"smallest session count at which >= {cfg.power:.0%} of "
                       f"{cfg.replications} independent simulated experiments reach "
                       f"p < {cfg.alpha} in favour of the champion (A/B: sessions over both "
                       "arms, 50/50 user hash, CTR delta-method z-test; interleaving: "
                       "team-draft grids, two-sided sign test); winner: the online-eval "
                       "verdict on one full-size replication"),
        "rankers": ("truth-based rankers with controlled noise over the world's true "
                    "relevance (not the trained embedder): score = relevance + N(0, sigma^2) "
                    "within the wanted product's category"),
        "champion_noise_sigma": cfg.champion_noise,
        "users": "pipelines.world.behaviour model: examination k^-0.7, clicks by "
                 "relevance x popularity, saves after clicks; user_activity_cv > 0 scales "
                 "examination per user by Gamma(mean 1, that CV)",
        "world": str(world_root), "study": asdict(cfg),
        **{k: head[k] for k in ("challenger_noise_sigma", "ctr_relative_diff_full_run",
                                "interleaving_preference_full_run",
                                "replications_preferring_challenger_significantly",
                                "power_curve")},
        "sensitivity": rows,
        "user_heterogeneity": activity_rows,
        "example_full_run": example,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _full_run_analysis(run: dict, cfg: StudyConfig) -> dict:
    """online_eval's A/B and interleaving statistics on one replication's full sessions."""
    est = [online_eval.ratio_estimate(run["clicks"][run["is_challenger"] == arm],
                                      np.full(int((run["is_challenger"] == arm).sum()), GRID_SIZE))
           for arm in (False, True)]
    comparison = online_eval.compare(est[0], est[1])
    ab = {"arms": {name: {"ctr": e.value, "ctr_ci": list(e.ci), "users": e.units}
                   for name, e in zip(("champion", "challenger"), est, strict=True)},
          "tests": {"ctr": asdict(comparison)},
          "users_per_arm_needed_ctr": online_eval.finite_or_none(
              online_eval.ab_users_per_arm(est[0], est[1]))}
    w = run["winner"]
    sign = online_eval.sign_test(int((w == 1).sum()), int((w == -1).sum()),
                                 int((w == 0).sum()))
    inter = {**asdict(sign), "grids_needed": online_eval.finite_or_none(
        online_eval.interleaving_grids_needed(sign))}
    winner, line = online_eval.decide(ab, inter, ("champion", "challenger"), cfg.alpha)
    return {"sessions": cfg.max_sessions, "ab": ab, "interleaving": inter,
            "verdict": line, "winner": winner}


def add_cli(sub) -> None:
    p = sub.add_parser("simulate-traffic",
                       help="simulated users against a front door, or the session-count study")
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--api", default=None, help="front-door base URL (serving/api/online.py)")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--study", type=Path, default=None, metavar="REPORT_JSON",
                   help="run the in-process session-count study and write its report here")
    p.add_argument("--challenger-noise", type=float, default=StudyConfig.challenger_noise)
    p.add_argument("--max-sessions", type=int, default=StudyConfig.max_sessions)
    p.add_argument("--replications", type=int, default=StudyConfig.replications)
    p.add_argument("--sensitivity", type=float, nargs="*", default=(), metavar="SIGMA",
                   help="also report other challenger noise levels")
    p.add_argument("--user-activity-cv", type=float, nargs="*", default=(), metavar="CV",
                   help="also report users whose activity varies with this CV")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.study is not None:
        cfg = StudyConfig(challenger_noise=args.challenger_noise, seed=args.seed,
                          max_sessions=args.max_sessions, replications=args.replications)
        report = session_study(args.world, cfg, tuple(args.sensitivity),
                               tuple(args.user_activity_cv))
        write_text_atomic(args.study, json.dumps(report, indent=1))
        print(json.dumps({k: report[k] for k in ("ab_sessions_needed",
                                                 "interleaving_sessions_needed", "winner")}))
        print(report["verdict_full_run"])
        return 0
    if args.api is None:
        raise ValueError("give --api URL (live traffic) or --study REPORT_JSON")
    with httpx.Client(base_url=args.api, timeout=10.0) as client:
        summary = drive_api(client, args.world, args.sessions, args.seed)
    print(json.dumps(asdict(summary), indent=1))
    return 0
