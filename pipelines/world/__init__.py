"""Demo product world with known ground truth.

Loupe cannot download data, so it generates a shop: products drawn procedurally in style
clusters (`catalog`), seller photos under varied conditions and room scenes with boxes
(`render`, `scenes`), engagement logs from a position-biased logging policy (`sessions`, with
the users and the ranker of `behaviour`), board co-saves (`boards`) and a rater set
(`raters`). `generate` writes them; `spec` holds the sizes, the clock and the seeded streams
that make the output bytes depend only on (size, seed).
"""

from pipelines.world.behaviour import LoggingPolicy, examination_propensity
from pipelines.world.catalog import CATEGORIES, make_catalog, make_products
from pipelines.world.generate import generate_first_catalog, generate_world
from pipelines.world.identity import world_id
from pipelines.world.samples import save_samples
from pipelines.world.spec import SIZES, WORLD_END, WorldSize

__all__ = ["CATEGORIES", "SIZES", "WORLD_END", "LoggingPolicy", "WorldSize",
           "examination_propensity", "generate_first_catalog", "generate_world",
           "make_catalog", "make_products", "save_samples", "world_id"]
