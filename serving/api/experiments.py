"""Online experiments: deterministic user-hash arms and team-draft interleaving.

Assignment hashes (salt, user id) into [0, 1) and walks the configured traffic shares, so a
user stays in one arm across requests, processes and restarts, arms get their shares, and a
new salt re-randomises. One arm may be `interleaved`: its grids mix two rankers by
**team-draft interleaving** (Radlinski, Kurup, Joachims, *How does clickthrough data reflect
retrieval quality?*, CIKM 2008): in each round the team with fewer picks (a fair coin on a
tie) adds its best item not yet shown, and every shown item remembers the team that placed
it. A grid's clicks then credit teams; the ranker whose items get more clicks wins it.

A share of A/B grids (`randomised_share`) is logged with its top GRID_SIZE shuffled
(`RANDOMISED_POLICY`), the randomised traffic the harvester estimates position bias from.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_contracts.constants import GRID_SIZE

INTERLEAVED = "interleaved"
TEAM_A, TEAM_B = "A", "B"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments.yaml"


@dataclass(frozen=True)
class ExperimentConfig:
    experiment: str
    salt: str
    traffic: dict[str, float]  # arm -> share of users (ordered as in the file)
    rankers: dict[str, str] = field(default_factory=dict)  # ranker -> search API base URL
    interleave: tuple[str, str] | None = None  # (team A ranker, team B ranker)
    randomised_share: float = 0.0

    def __post_init__(self) -> None:
        if not self.experiment or not self.salt:
            raise ValueError("an experiment needs a name and a salt")
        if not self.traffic or any(s < 0 for s in self.traffic.values()):
            raise ValueError(f"traffic shares must be non-negative, got {self.traffic}")
        if abs(sum(self.traffic.values()) - 1.0) > 1e-9:
            raise ValueError(f"traffic shares must sum to 1, got {sum(self.traffic.values())}")
        if not 0.0 <= self.randomised_share <= 1.0:
            raise ValueError(f"randomised_share must be in [0, 1], got {self.randomised_share}")
        if INTERLEAVED in self.traffic:
            if self.interleave is None or len(set(self.interleave)) != 2:
                raise ValueError("an 'interleaved' arm needs `interleave: [ranker A, ranker B]`"
                                 " with two different rankers")
        needed = {a for a in self.traffic if a != INTERLEAVED} | set(self.interleave or ())
        if self.rankers and needed - set(self.rankers):
            raise ValueError(f"no ranker configured for {sorted(needed - set(self.rankers))}")

    @classmethod
    def load(cls, path: Path | None = None) -> ExperimentConfig:
        path = Path(path) if path is not None else DEFAULT_CONFIG
        if not path.exists():
            raise FileNotFoundError(f"experiment config not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"experiment", "salt", "traffic", "rankers", "interleave",
                              "randomised_share"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        try:
            return cls(experiment=str(raw["experiment"]), salt=str(raw["salt"]),
                       traffic={str(k): float(v) for k, v in raw["traffic"].items()},
                       rankers={str(k): str(v) for k, v in (raw.get("rankers") or {}).items()},
                       interleave=tuple(raw["interleave"]) if raw.get("interleave") else None,
                       randomised_share=float(raw.get("randomised_share", 0.0)))
        except KeyError as err:
            raise ValueError(f"{path}: missing key {err}") from err

    def arm_rankers(self, arm: str) -> tuple[str, ...]:
        """The ranker(s) an arm's grids come from: one, or (A, B) when interleaved."""
        if arm not in self.traffic:
            raise ValueError(f"unknown arm {arm!r}; arms: {sorted(self.traffic)}")
        return tuple(self.interleave) if arm == INTERLEAVED else (arm,)


def unit_hash(*parts: str) -> float:
    """A stable uniform number in [0, 1) from strings (SHA-256; not Python's salted hash)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(cfg: ExperimentConfig, user_id: str) -> str:
    """The user's arm: where hash(salt, user) falls among the cumulative traffic shares."""
    if not user_id:
        raise ValueError("arm assignment needs a user id")
    u = unit_hash(cfg.salt, "arm", user_id)
    edge = 0.0
    arms = list(cfg.traffic)
    for arm in arms:
        edge += cfg.traffic[arm]
        if u < edge:
            return arm
    return next(a for a in reversed(arms) if cfg.traffic[a] > 0)  # float round-off at 1.0


def is_randomised(cfg: ExperimentConfig, request_id: str) -> bool:
    """Whether this A/B request's grid is logged shuffled (deterministic per request)."""
    return unit_hash(cfg.salt, "shuffle", request_id) < cfg.randomised_share


def shuffle_top(items: Sequence, request_id: str, n: int = GRID_SIZE) -> list:
    """The first `n` items in a random order seeded by the request id, the rest unchanged."""
    head = list(items[:n])
    random.Random(unit_hash("shuffle-order", request_id)).shuffle(head)
    return head + list(items[n:])


def team_draft(ranking_a: Sequence[str], ranking_b: Sequence[str], k: int,
               coin: Callable[[], bool]) -> list[tuple[str, str]]:
    """Team-draft interleave two rankings into `k` (item, team) pairs.

    `coin()` -> True lets team A pick first in a round where both teams have picked
    equally often. A team whose ranking is exhausted leaves the picks to the other.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    shown: list[tuple[str, str]] = []
    seen: set[str] = set()
    picks = {TEAM_A: 0, TEAM_B: 0}
    rankings = {TEAM_A: list(ranking_a), TEAM_B: list(ranking_b)}
    cursor = {TEAM_A: 0, TEAM_B: 0}

    def next_item(team: str) -> str | None:
        ranking = rankings[team]
        while cursor[team] < len(ranking) and ranking[cursor[team]] in seen:
            cursor[team] += 1
        return ranking[cursor[team]] if cursor[team] < len(ranking) else None

    while len(shown) < k:
        a_turn = picks[TEAM_A] < picks[TEAM_B] or (picks[TEAM_A] == picks[TEAM_B] and coin())
        order = (TEAM_A, TEAM_B) if a_turn else (TEAM_B, TEAM_A)
        team, item = next(((t, i) for t in order if (i := next_item(t)) is not None),
                          (None, None))
        if item is None:
            break
        shown.append((item, team))
        seen.add(item)
        picks[team] += 1
    return shown


def seeded_coin(request_id: str) -> Callable[[], bool]:
    """Fair coin flips that replay identically for the same request id."""
    rng = random.Random(unit_hash("team-draft", request_id))
    return lambda: rng.random() < 0.5


def interleaving_winner(teams: Sequence[str], clicked: Sequence[bool]) -> str | None:
    """Team A or B when its items got more clicks in the grid, None on a tie."""
    a = sum(1 for t, c in zip(teams, clicked, strict=True) if c and t == TEAM_A)
    b = sum(1 for t, c in zip(teams, clicked, strict=True) if c and t == TEAM_B)
    return TEAM_A if a > b else TEAM_B if b > a else None
