"""How the world's users and its legacy logging ranker behave: the one model of both.

The generator logs its sessions with it and `pipelines.simulate_traffic` clicks on served
grids with it, so served logs look like the world's:
- a user wants one product, drawn by popularity, and sends a photo of it;
- relevance: the graded truth of an item to the wanted product;
- examination: the user examines grid position k with probability k^-0.7;
- clicks: an examined item is clicked with its attractiveness (appeal scaled by popularity);
- saves follow clicks, more often on relevant items;
- `LoggingPolicy`: how the legacy ranker filled the logged grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_contracts.constants import GRID_SIZE, RANDOMISED_POLICY, RANKER_POLICY

STYLE_ATTRIBUTES = ("shape_family", "palette", "pattern", "material")
# what relevance compares: a product's identity, its style cluster, then its style
TRUTH_COLUMNS = ("product_id", "cluster_id", *STYLE_ATTRIBUTES)


def relevance(target: np.ndarray, items: np.ndarray) -> np.ndarray:
    """True graded relevance of items to a wanted product: same product 0.95, same style
    cluster 0.6, two shared style attributes 0.2, else 0.06.

    `target` is the wanted product's TRUTH_COLUMNS row and `items` one such row per item,
    in any representation that compares equal where the truth does (ids or integer codes).
    """
    same = np.asarray(items) == np.asarray(target)
    shared = same[:, 2:].sum(axis=1)
    return np.where(same[:, 0], 0.95, np.where(same[:, 1], 0.6,
                    np.where(shared >= 2, 0.2, 0.06)))


def wanted_product(popularity: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the product a user wants: drawn in proportion to popularity."""
    return int(rng.choice(len(popularity), p=popularity / popularity.sum()))


def examination_propensity(position: np.ndarray | int) -> np.ndarray:
    """True probability that a user examines grid position k (1-based): k^-0.7."""
    return np.power(np.asarray(position, dtype=np.float64), -0.7)


def respond(relevance: np.ndarray, popularity: np.ndarray, rng: np.random.Generator,
            appeal: np.ndarray | None = None, activity: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """(clicked, saved) per grid position of one user looking at one grid.

    `relevance` and `popularity` are the shown items' in grid order; `appeal` is how
    clickable an item looks (default: its relevance; a pin's badge lifts it); `activity`
    scales how far down this user examines (1 = the world's one user type).
    """
    appeal = relevance if appeal is None else appeal
    attract = appeal * (0.6 + 0.8 * popularity)
    exam = np.clip(activity * examination_propensity(np.arange(1, len(relevance) + 1)), 0, 1)
    clicked = rng.random(len(relevance)) < exam * np.clip(attract, 0, 1)
    saved = clicked & (rng.random(len(relevance)) < 0.2 + 0.5 * (relevance >= 0.6))
    return clicked, saved


@dataclass(frozen=True)
class LoggedGrid:
    """One grid the logging ranker showed, in grid order."""

    order: np.ndarray  # candidate indices
    scores: np.ndarray  # the ranker's noisy score of each shown item
    appeal: np.ndarray  # how clickable each shown item looks (relevance, or a pin's badge)
    policy: str  # RANKER_POLICY or RANDOMISED_POLICY


@dataclass(frozen=True)
class LoggingPolicy:
    """How the legacy ranker that logged the sessions filled the grid.

    It ranks by noisy true relevance, except that a "shop the colour" merchandising rule pins
    `promoted_slots` bestsellers of the query's category and palette (picked by
    popularity ** power, never from the query's own style cluster) to the top of the grid,
    with a badge that makes them clicked readily. They collect clicks for sitting on top, so a
    learner that ignores position learns "same colour = same style": the feedback loop that
    position-bias correction exists for. Randomised sessions shuffle the whole grid, pins
    included, so the examination estimate stays valid.
    """

    relevance_noise: float = 0.25
    promoted_slots: int = 3
    promoted_popularity_power: float = 4.0
    promoted_same_palette: bool = True  # "shop the colour": pins share the query's palette
    promoted_appeal: float = 0.3  # a pin's badge: clicked at least this readily once examined

    def fill_grid(self, relevance: np.ndarray, same_cluster: np.ndarray,
                  same_palette: np.ndarray, popularity: np.ndarray, shuffle_share: float,
                  rng: np.random.Generator, pin_rng: np.random.Generator) -> LoggedGrid:
        """The grid for one query over its candidates (the wanted product's category).

        Per candidate: true `relevance`, whether it shares the wanted product's style cluster
        and palette, and its popularity. Pins draw from their own `pin_rng`, so the rest of
        the session does not depend on them; a `shuffle_share` of grids is randomised.
        """
        score = relevance + rng.normal(0, self.relevance_noise, len(relevance))
        top = np.argsort(-score)[:GRID_SIZE]
        promoted = top[:0]
        if self.promoted_slots:
            eligible = ~same_cluster
            matched = eligible & same_palette
            if self.promoted_same_palette and matched.sum() >= self.promoted_slots:
                eligible = matched
            candidates = np.flatnonzero(eligible)
            w = popularity[candidates] ** self.promoted_popularity_power
            promoted = pin_rng.choice(candidates, self.promoted_slots, replace=False,
                                      p=w / w.sum())
            top = np.concatenate([promoted, top[~np.isin(top, promoted)]])[:GRID_SIZE]
        shuffled = rng.random() < shuffle_share
        order = rng.permutation(top) if shuffled else top
        appeal = np.where(np.isin(order, promoted),
                          np.maximum(relevance[order], self.promoted_appeal), relevance[order])
        return LoggedGrid(order, score[order], appeal,
                          RANDOMISED_POLICY if shuffled else RANKER_POLICY)
