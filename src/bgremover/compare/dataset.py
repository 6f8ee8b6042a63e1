"""What the compared runs were trained and tested on: their class list and their test split, CamVid's or their own
image/mask folder's (`data=folder`, `make remover`), read from each run's summary.json (its resolved config).

A report over `make remover` runs spoke of "the CamVid test split" and "the 11 classes", showed CamVid's per-class
table (all "—") and looked for its grid in `<folder>/test` as CamVid lays it out; runs of different class lists
would have been averaged and tabled as one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND
from bgremover.run_dirs import folder_root

CAMVID_TEST = "the CamVid test split"


def _config(summary: dict[str, Any]) -> dict[str, Any]:
    config = summary.get("config")
    return config if isinstance(config, dict) else {}


def classes_of(summary: dict[str, Any]) -> tuple[str, ...]:
    """The classes a run's per-class numbers name: model.class_names, which training sets from its data (and
    writes into the checkpoint too); CamVid's for summaries written before it was recorded."""
    names = (_config(summary).get("model") or {}).get("class_names")
    return tuple(str(c) for c in names) if isinstance(names, list) and names else CLASSES


def foreground_of(summary: dict[str, Any]) -> tuple[str, ...]:
    """The classes its cut-outs keep by default (model.default_foreground); CamVid's default where unrecorded."""
    names = (_config(summary).get("model") or {}).get("default_foreground")
    return tuple(str(c) for c in names) if isinstance(names, list) else DEFAULT_FOREGROUND


def folder_of(summary: dict[str, Any]) -> str | None:
    """The image/mask folder a data=folder run trained and was tested on, None for a CamVid run."""
    return folder_root(_config(summary).get("data") or {})


def shared_classes(runs: list) -> tuple[str, ...]:
    """The class list every finished run shares (CamVid's when none finished); CompareError when they differ: an
    mIoU over 2 classes beside one over 11, or per-class columns of one list filled from another, compare nothing."""
    from bgremover.compare.runs import CompareError

    lists: dict[tuple[str, ...], Any] = {}
    for r in runs:
        if r.ok:
            lists.setdefault(classes_of(r.summary), r)
    if len(lists) > 1:
        # folder names and short lists: the one error line is cut at 300 characters (errors.report)
        said = "; ".join(f"{Path(r.dir).name}: {len(c)} ({', '.join(c) if len(c) <= 4 else f'{c[0]} … {c[-1]}'})"
                         for c, r in lists.items())
        raise CompareError(f"the runs segment different classes ({said}): compare runs of one class list at a time")
    return next(iter(lists), CLASSES)


def on_camvid(runs: list) -> bool:
    """Whether the finished runs were tested on CamVid (none on a folder of their own)."""
    return not any(r.ok and folder_of(r.summary) for r in runs)


def folders(runs: list) -> list[str]:
    """The image/mask folders the finished runs were tested on (none for CamVid runs)."""
    return sorted({f for r in runs if r.ok and (f := folder_of(r.summary))})


def test_set(runs: list) -> str:
    """The test split the numbers are on, as the report says it: CamVid's, or the runs' own folder's."""
    folders_ = folders(runs)
    if not folders_:
        return CAMVID_TEST
    own = (f"the test split of the image/mask folder {folders_[0]}" if len(folders_) == 1 else
           f"the test splits of the image/mask folders {', '.join(folders_)} (each run's own)")
    return own + (f" and {CAMVID_TEST}" if any(r.ok and not folder_of(r.summary) for r in runs) else "")


def table_classes(stats: list) -> list[str]:
    """The per-class columns of the tables and charts: the rows' own classes (one list: shared_classes)."""
    return list(stats[0].class_iou) if stats else list(CLASSES)
