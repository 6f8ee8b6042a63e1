"""Fine-tuning from the shipped CamVid net vs training from scratch, same folder, same recipe, same time budget.

    python benchmarks/finetune_vs_scratch.py --data data/cars-composite [--budget 1800] [--out logs/finetune_vs_scratch]

Runs `python -m bgremover.train_remover DATA` (experiments/remover.yaml: DeepLabV3+/MobileNetV2, AdamW + warm-up/
cosine annealed to 0 at the budget) twice, one after the other: as it is (`ckpt_init` = models/bgremover-camvid.pt,
classifier re-initialised) and with `ckpt_init=null`. Each arm's output goes to <out>/<arm>.log; the table at the
end has both arms' held-out test numbers side by side, the training steps each got and the load average around
each arm (the CPU may be shared: the steps column shows how much compute each arm really had). The fine-tune arm
is exactly what `make remover DATA=...` runs, and the test columns are the numbers it prints: each exported
remover.onnx on the held-out images at full resolution, through the predictor, as `make eval-cutout` scores it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bgremover.errors import OneLineParser
from bgremover.train_remover import MODEL_NAME, score_held_out
from bgremover.utils import cpu_kind

ARMS = {"finetune": [], "scratch": ["ckpt_init=null"]}



def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_arm(name: str, data: Path, out: Path, budget: int, extra: list[str]) -> dict:
    run = out / name
    cmd = [sys.executable, "-m", "bgremover.train_remover", str(data), "--run-dir", str(run),
           f"remover_budget_s={budget}", *ARMS[name], *extra]
    before, start = load(), time.time()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall, after = time.time() - start, load()
    if rc != 0:
        raise SystemExit(f"error: the {name} arm failed (exit {rc}); see {out / f'{name}.log'}")
    s = json.loads((run / "summary.json").read_text())
    # summary.json's test/* are the test stage's, at the training scale (data.image_size): on images larger than
    # that they differ from what the run printed for its remover.onnx, so score that file as the run did
    held = score_held_out(run, data, run / MODEL_NAME) or {"cutout": {}, "n_images": 0}
    c = held["cutout"]
    fg = [v for v in s["history"].get("val/fg_iou", []) if v == v]
    return {"arm": name, "steps": s["global_step"], "epochs": s["epochs"], "fit_s": s["wall_time_s"], "wall_s": wall,
            "val_fg_best": max(fg) if fg else float("nan"), "fg_iou": c.get("fg_iou"),
            "boundary_f": c.get("boundary_f"), "alpha_mae": c.get("mae"), "miou": held.get("mIoU"),
            "frames": held["n_images"], "load_before": before, "load_after": after}


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"  # "-": no held-out image to score


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="image/mask folder (e.g. from bgremover.data.make_folder)")
    p.add_argument("--budget", type=int, default=1800, help="seconds of training per arm (default 1800, the remover recipe's)")
    p.add_argument("--out", type=Path, default=Path("logs/finetune_vs_scratch"))
    p.add_argument("--arms", default="finetune,scratch")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both arms")
    args = p.parse_intermixed_args()
    arms = args.arms.split(",")
    # each arm once: a second run of one would write into the first's folder, which train_remover refuses
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) < len(arms):
        p.error(f"--arms: a comma list of {', '.join(ARMS)}, each at most once (got {args.arms!r})")
    # train_remover refuses a run folder that already holds a run: find out now, not after the first arm's budget
    taken = [str(args.out / a) for a in arms if (args.out / a).exists()]
    if taken:
        p.error(f"{', '.join(taken)} already exist(s) from an earlier run: pass a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_kind()}; torch threads: default; budget {args.budget} s per arm; data {args.data}", flush=True)
    rows = []
    for name in arms:
        rows.append(run_arm(name, args.data.resolve(), args.out.resolve(), args.budget, args.overrides))
        r = rows[-1]
        print(f"{name}: done in {r['wall_s']:.0f} s (load {r['load_before']} → {r['load_after']})", flush=True)
    print(f"\nheld-out test ({rows[0]['frames']} images), {args.budget} s of training each:")
    print("| init | steps (epochs) | fit s | best val fg IoU | test fg IoU | boundary F (2 px) | alpha MAE | mIoU "
          "| load avg before → after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        init = "CamVid net (models/bgremover-camvid.pt)" if r["arm"] == "finetune" else "scratch"
        print(f"| {init} | {r['steps']} ({r['epochs']}) | {r['fit_s']:.0f} | {r['val_fg_best']:.4f} | "
              f"{_f(r['fg_iou'])} | {_f(r['boundary_f'])} | {_f(r['alpha_mae'])} | {_f(r['miou'])} | "
              f"{r['load_before']} → {r['load_after']} |")
    if len(rows) == 2 and rows[0]["frames"]:
        a, b = rows
        print(f"\nfg IoU {a['arm']} − {b['arm']}: {a['fg_iou'] - b['fg_iou']:+.4f}; boundary F: "
              f"{a['boundary_f'] - b['boundary_f']:+.4f}; alpha MAE: {a['alpha_mae'] - b['alpha_mae']:+.4f}")
    (args.out / "result.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
