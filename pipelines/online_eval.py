"""Online evaluation: A/B click-through and save rate per arm, interleaving preference.

Reads the impression log's export (`impressions.parquet` in the contracted schema plus
`impression_context.parquet`, see serving/api/impressions.py) and answers "is the
challenger better than the champion on what users do?".

A/B: users are the randomisation unit, so CTR (clicks / impressions) and save rate are
ratio metrics over users; their variance comes from the delta method over per-user sums
(Deng, Lu, Litz, *Applying the Delta Method in Metric Analytics*, KDD 2018), giving a 95 %
confidence interval per arm and a two-sided z-test on the difference. Grids logged with the
top of the ranking shuffled (`constants.RANDOMISED_POLICY`, the harvester's randomised share)
show neither arm's ranking and are left out.

Interleaving: each team-drafted grid is won by the team whose items got more clicks; ties
(mostly no clicks) say nothing. Preference = wins_A / decided grids, tested against 1/2
with an exact two-sided binomial (sign) test.

Sample size: users per arm for the observed CTR difference at alpha 0.05 and power 0.8,
and interleaved grids for the observed preference, both from the normal approximation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest, norm

from data_contracts.constants import RANKER_POLICY
from data_contracts.durable import write_text_atomic

ALPHA = 0.05
POWER = 0.8
Z_CI = float(norm.ppf(0.975))


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio metric sum(y) / sum(n) over units, with its delta-method standard error."""

    value: float
    se: float
    units: int
    numerator: float
    denominator: float

    @property
    def ci(self) -> tuple[float, float]:
        return (self.value - Z_CI * self.se, self.value + Z_CI * self.se)

    @property
    def unit_variance(self) -> float:
        """Variance of one unit's linearised contribution (se^2 * units)."""
        return self.se**2 * self.units


def ratio_from_moments(units: int, sy: float, sn: float, syy: float, snn: float,
                       syn: float) -> RatioEstimate:
    """Delta-method ratio estimate from per-unit sums: Σy, Σn, Σy², Σn², Σyn over units."""
    if units < 2 or sn <= 0:
        raise ValueError(f"a ratio needs at least 2 units with impressions, got {units}")
    r = sy / sn
    mean_n = sn / units
    var_y = (syy - sy * sy / units) / (units - 1)
    var_n = (snn - sn * sn / units) / (units - 1)
    cov = (syn - sy * sn / units) / (units - 1)
    var_r = max(var_y - 2 * r * cov + r * r * var_n, 0.0) / (units * mean_n * mean_n)
    return RatioEstimate(r, math.sqrt(var_r), units, sy, sn)


def ratio_estimate(y: np.ndarray, n: np.ndarray) -> RatioEstimate:
    """`y`, `n`: per-unit numerators and denominators (e.g. clicks and impressions)."""
    y, n = np.asarray(y, np.float64), np.asarray(n, np.float64)
    return ratio_from_moments(len(y), y.sum(), n.sum(), (y * y).sum(), (n * n).sum(),
                              (y * n).sum())


@dataclass(frozen=True)
class Comparison:
    control: float
    treatment: float
    diff: float  # treatment - control
    relative: float  # diff / control
    ci_low: float
    ci_high: float
    z: float
    p_value: float


def compare(control: RatioEstimate, treatment: RatioEstimate) -> Comparison:
    """Two-sided z-test on the difference of two independent ratio estimates."""
    diff = treatment.value - control.value
    se = math.hypot(control.se, treatment.se)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    p = float(2 * norm.sf(abs(z)))
    return Comparison(control.value, treatment.value, diff,
                      diff / control.value if control.value else math.nan,
                      diff - Z_CI * se, diff + Z_CI * se, z, p)


def ab_users_per_arm(control: RatioEstimate, treatment: RatioEstimate,
                     alpha: float = ALPHA, power: float = POWER) -> float:
    """Users per arm to detect the observed difference (normal approximation)."""
    diff = treatment.value - control.value
    if diff == 0:
        return math.inf
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return float(z * z * (control.unit_variance + treatment.unit_variance) / diff**2)


@dataclass(frozen=True)
class InterleavingResult:
    grids: int
    wins_a: int
    wins_b: int
    ties: int
    preference_a: float  # wins_a / decided grids
    p_value: float

    @property
    def decided(self) -> int:
        return self.wins_a + self.wins_b


def sign_test(wins_a: int, wins_b: int, ties: int = 0) -> InterleavingResult:
    decided = wins_a + wins_b
    p = binomtest(wins_a, decided, 0.5).pvalue if decided else 1.0
    return InterleavingResult(decided + ties, wins_a, wins_b, ties,
                              wins_a / decided if decided else 0.5, float(p))


def interleaving_grids_needed(result: InterleavingResult, alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """Interleaved grids to detect the observed preference (normal approx. to the sign
    test, scaled by the share of grids that decide)."""
    p = result.preference_a
    if result.decided == 0 or p == 0.5:
        return math.inf
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    decided = ((za * 0.5 + zb * math.sqrt(p * (1 - p))) / (p - 0.5)) ** 2
    return float(decided * result.grids / result.decided)


# --------------------------------------------------------------------------- from logs
def load_logs(export_dir: Path) -> pd.DataFrame:
    """Impressions joined with their context (arm, team, versions), one row per shown item."""
    export_dir = Path(export_dir)
    paths = [export_dir / "impressions.parquet", export_dir / "impression_context.parquet"]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: export the impression log first")
    imp, ctx = (pd.read_parquet(p) for p in paths)
    frame = imp.merge(ctx, on="impression_id", how="left", validate="one_to_one")
    if frame["arm"].isna().any():
        raise ValueError(f"{int(frame['arm'].isna().sum())} impressions have no context row")
    return frame


def ab_analysis(frame: pd.DataFrame, control: str, treatment: str) -> dict:
    """Per-arm CTR and save rate (with CIs) and the treatment-vs-control tests."""
    ab = frame[(frame["logging_policy"] == RANKER_POLICY)
               & frame["arm"].isin([control, treatment])]
    per_user = ab.groupby(["arm", "user_id"]).agg(
        impressions=("clicked", "size"), clicks=("clicked", "sum"), saves=("saved", "sum"),
        grids=("request_id", "nunique"))
    arms: dict[str, dict] = {}
    est: dict[tuple[str, str], RatioEstimate] = {}
    for arm in (control, treatment):
        if arm not in per_user.index.get_level_values(0):
            raise ValueError(f"no ranker-policy grids logged for arm {arm!r}")
        u = per_user.loc[arm]
        arms[arm] = {"users": len(u), "grids": int(u["grids"].sum()),
                     "impressions": int(u["impressions"].sum())}
        for metric, col in (("ctr", "clicks"), ("save_rate", "saves")):
            e = ratio_estimate(u[col].to_numpy(), u["impressions"].to_numpy())
            est[arm, metric] = e
            arms[arm][metric] = e.value
            arms[arm][f"{metric}_ci"] = list(e.ci)
    tests = {m: asdict(compare(est[control, m], est[treatment, m]))
             for m in ("ctr", "save_rate")}
    return {"control": control, "treatment": treatment, "arms": arms, "tests": tests,
            "users_per_arm_needed_ctr": finite_or_none(ab_users_per_arm(est[control, "ctr"],
                                                                 est[treatment, "ctr"]))}


def interleaving_analysis(frame: pd.DataFrame, arm: str = "interleaved") -> dict:
    """Team wins per interleaved grid and the sign test (team A = the first ranker)."""
    grids = frame[frame["arm"] == arm]
    if grids.empty:
        raise ValueError(f"no grids logged for the interleaved arm {arm!r}")
    clicks = grids[grids["clicked"]].groupby(["request_id", "team"]).size().unstack(
        fill_value=0).reindex(columns=["A", "B"], fill_value=0)
    clicks = clicks.reindex(grids["request_id"].unique(), fill_value=0)
    wins_a = int((clicks["A"] > clicks["B"]).sum())
    wins_b = int((clicks["B"] > clicks["A"]).sum())
    result = sign_test(wins_a, wins_b, len(clicks) - wins_a - wins_b)
    return {**asdict(result), "grids_needed": finite_or_none(interleaving_grids_needed(result))}


def decide(ab: dict | None, interleaving: dict | None, names: tuple[str, str],
           alpha: float = ALPHA) -> tuple[str | None, str]:
    """(winner or None, verdict line): which ranker users prefer, on which evidence."""
    control, treatment = names
    parts, votes = [], set()
    if ab is not None:
        t = ab["tests"]["ctr"]
        parts.append(f"A/B CTR {treatment} vs {control} {t['relative']:+.1%} "
                     f"(p={t['p_value']:.2g})")
        if t["p_value"] < alpha:
            votes.add(treatment if t["diff"] > 0 else control)
    if interleaving is not None:
        parts.append(f"interleaving prefers {control} in {interleaving['preference_a']:.1%} of "
                     f"{interleaving['wins_a'] + interleaving['wins_b']} decided grids "
                     f"(p={interleaving['p_value']:.2g})")
        if interleaving["p_value"] < alpha:
            votes.add(control if interleaving["preference_a"] > 0.5 else treatment)
    winner = next(iter(votes)) if len(votes) == 1 else None
    if winner is not None:
        head = f"WINNER {winner}"
    elif votes:
        head = "CONFLICT: A/B and interleaving disagree"
    else:
        head = f"UNDECIDED at alpha {alpha}"
    return winner, f"{head}: " + "; ".join(parts)


def finite_or_none(x: float) -> float | None:
    """JSON has no infinity: an unreachable sample size is null."""
    return float(x) if math.isfinite(x) else None


def online_eval(export_dir: Path, control: str = "champion", treatment: str = "challenger",
                interleaved_arm: str = "interleaved") -> dict:
    """The whole analysis of one export; parts whose arms were not logged are None."""
    frame = load_logs(export_dir)
    arms = set(frame["arm"])
    ab = ab_analysis(frame, control, treatment) if {control, treatment} <= arms else None
    inter = interleaving_analysis(frame, interleaved_arm) if interleaved_arm in arms else None
    if ab is None and inter is None:
        raise ValueError(f"the logs hold neither both A/B arms ({control}, {treatment}) nor "
                         f"the interleaved arm; arms seen: {sorted(arms)}")
    winner, line = decide(ab, inter, (control, treatment))
    return {"experiment": sorted(set(frame["experiment"])),
            "model_versions": sorted(set(frame["model_version"])),
            "ab": ab, "interleaving": inter, "verdict": line, "winner": winner}


def log_to_mlflow(result: dict, report_path: Path, tracking_uri: str | None = None,
                  run_name: str = "online-eval") -> str:
    """One MLflow run (experiment `loupe-online-eval`) with the metrics and the report."""
    from pipelines.registry import RegistryConfig, log_run

    metrics: dict[str, float] = {}
    if result.get("ab"):
        for arm, m in result["ab"]["arms"].items():
            metrics |= {f"{arm}_ctr": m["ctr"], f"{arm}_save_rate": m["save_rate"],
                        f"{arm}_users": m["users"]}
        for metric, t in result["ab"]["tests"].items():
            metrics |= {f"ab_{metric}_diff": t["diff"], f"ab_{metric}_p": t["p_value"]}
    if result.get("interleaving"):
        i = result["interleaving"]
        metrics |= {"interleaving_preference_a": i["preference_a"],
                    "interleaving_p": i["p_value"], "interleaving_grids": i["grids"]}
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    cfg = RegistryConfig(tracking_uri=tracking_uri, experiment="loupe-online-eval")
    run = log_run(cfg, run_name=run_name, params={"winner": result.get("winner")},
                  metrics=metrics, artifacts={"online_eval": [Path(report_path)]},
                  tags={"verdict": result["verdict"][:250]})
    return run.run_id


def add_cli(sub) -> None:
    p = sub.add_parser("online-eval", help="A/B and interleaving analysis of served logs")
    p.add_argument("--logs", type=Path, required=True,
                   help="export dir with impressions.parquet + impression_context.parquet")
    p.add_argument("--control", default="champion")
    p.add_argument("--treatment", default="challenger")
    p.add_argument("--out", type=Path, required=True, help="report JSON path")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    result = online_eval(args.logs, args.control, args.treatment)
    write_text_atomic(args.out, json.dumps(result, indent=1))
    if not args.no_mlflow:
        result["mlflow_run_id"] = log_to_mlflow(result, args.out, args.tracking_uri)
    print(result["verdict"])
    return 0
