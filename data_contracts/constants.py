"""Constants that several layers must agree on; import them, never restate the value.

The world generator, the harvester, the contracts, the serving API and the traffic simulator
all read these (style after fsdl-text-recognizer's `metadata/`).
"""

from __future__ import annotations

# Result-grid length the demo world logs and the online front door serves. Real logs may use
# other grid lengths: the harvester takes the grid from the data, this is only the default.
GRID_SIZE = 20
# Deepest position an impression log may record: a sanity bound on real logs, not a grid size.
MAX_LOGGED_POSITION = 500

# Values of impressions.logging_policy (must match the world generator's logging ranker and
# the harvester's propensity estimator).
RANDOMISED_POLICY = "shuffle_top20"  # randomised share: the whole top GRID_SIZE shuffled
RANKER_POLICY = "ranker"
LOGGING_POLICIES = (RANKER_POLICY, RANDOMISED_POLICY)

# |norm - 1| allowed for a vector that claims to be L2-normalised (float32 round trip, fp16
# storage in the shards stays well inside it).
UNIT_NORM_TOL = 1e-3
