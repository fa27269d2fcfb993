"""Table schemas shared by the world generator, the pipelines and the contracts.

Real data plugs in by writing these same tables. Box coordinates are normalised to [0, 1]
of the image (x0, y0, x1, y1) so they survive resizing; `(0, 0, 1, 1)` means "whole image".
Paths are relative to the world (or data) root they live in.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

CATALOG = pa.schema(
    [
        ("item_id", pa.string()),  # one seller's listing of a product, one photo
        ("product_id", pa.string()),  # the same product sold by several sellers
        ("category", pa.string()),
        ("shape_family", pa.string()),
        ("palette", pa.string()),
        ("pattern", pa.string()),
        ("material", pa.string()),
        ("seller_id", pa.string()),
        ("price", pa.float64()),
        ("available", pa.bool_()),
        ("region", pa.string()),
        ("created_at", TS),
        ("image_path", pa.string()),
    ]
)

IMPRESSIONS = pa.schema(
    [
        ("impression_id", pa.string()),
        ("session_id", pa.string()),
        ("user_id", pa.string()),
        ("ts", TS),
        ("query_id", pa.string()),
        ("query_image_path", pa.string()),
        ("query_x0", pa.float64()),
        ("query_y0", pa.float64()),
        ("query_x1", pa.float64()),
        ("query_y1", pa.float64()),
        ("item_id", pa.string()),
        ("position", pa.int64()),  # 1-based rank in the grid the user saw
        ("logging_policy", pa.string()),  # one of constants.LOGGING_POLICIES
        ("ranker_score", pa.float64()),
        ("clicked", pa.bool_()),
        ("saved", pa.bool_()),
    ]
)

BOARDS = pa.schema(
    [
        ("board_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("saved_at", TS),
    ]
)

RATER_QUERIES = pa.schema(
    [
        ("rater_query_id", pa.string()),
        ("image_path", pa.string()),
        ("query_x0", pa.float64()),
        ("query_y0", pa.float64()),
        ("query_x1", pa.float64()),
        ("query_y1", pa.float64()),
        ("category", pa.string()),
        ("created_at", TS),
    ]
)

RATER_JUDGMENTS = pa.schema(
    [
        ("rater_query_id", pa.string()),
        ("item_id", pa.string()),
        ("grade", pa.int64()),  # 2 same product, 1 similar (same style), 0 not similar
        ("rater_id", pa.string()),
    ]
)

SCENES = pa.schema(
    [
        ("scene_id", pa.string()),
        ("image_path", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("split", pa.string()),  # train / val / test, by scene
    ]
)

SCENE_OBJECTS = pa.schema(
    [
        ("scene_id", pa.string()),
        ("object_idx", pa.int64()),
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("x0", pa.float64()),
        ("y0", pa.float64()),
        ("x1", pa.float64()),
        ("y1", pa.float64()),
    ]
)

EMBEDDING_DIM = 256
EMBEDDINGS = pa.schema(
    [
        ("item_id", pa.string()),
        ("model_version", pa.string()),
        ("vector", pa.list_(pa.float32(), EMBEDDING_DIM)),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "catalog": CATALOG,
    "impressions": IMPRESSIONS,
    "boards": BOARDS,
    "rater_queries": RATER_QUERIES,
    "rater_judgments": RATER_JUDGMENTS,
    "scenes": SCENES,
    "scene_objects": SCENE_OBJECTS,
    "embeddings": EMBEDDINGS,
}
