"""`python -m bgremover.compare`: a sweep's runs → a report folder (tables, charts, a qualitative grid, W&B).

One concern per module: `runs` (summaries → per-net statistics), `dataset` (the runs' classes and test split:
CamVid's or their own folder's), `render` (Markdown/HTML tables), `plots`
(charts), `grid` (the same test frames through every net), `wandb_log` (the same, as a W&B run), `report`
(the folder, written atomically, and the CLI).
"""

from bgremover.compare.grid import make_grid, pick_images, resolve_data_root
from bgremover.compare.report import Report, build_report, main
from bgremover.compare.runs import (
    CHECKER_RGB,
    HEADER_H,
    TILE_W,
    CompareError,
    NetStats,
    Run,
    aggregate,
    find_runs,
)

__all__ = [
    "CHECKER_RGB", "HEADER_H", "TILE_W", "CompareError", "NetStats", "Report", "Run", "aggregate", "build_report",
    "find_runs", "main", "make_grid", "pick_images", "resolve_data_root",
]
