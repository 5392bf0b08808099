"""Compare training recipes on a held-out drive: several `python -m training train` runs side by side, each
scored at the served size, in one table (issue 21's protocol: choose on drive 0006R0, never on valid.txt).

Each recipe is the shipped recipe (BASE: models/README.md, "How it was made") with its own options appended;
argparse keeps the last value of an option given twice, so an appended option overrides the base one. Built for a
GPU host, where a run of the shipped recipe takes minutes instead of the two hours it takes on 2 CPU cores, it runs
anywhere `python -m training` does.

    python bench/sweep.py --data ../shared/camvid --recipes bench/sweep_recipes.txt --parallel 3 \\
        --deadline-s 480 --out runs/sweep

A recipes file holds one recipe a line, `name: options` (`#` starts a comment). Runs still going at the deadline
are stopped and reported at their best epoch so far (the run directory keeps its resume state: `python -m
training train ... --resume` goes on). After every run that ends, the table so far is printed and written to
OUT/sweep.md, and the run's numbers appended to OUT/sweep.jsonl, so a sweep cut short still leaves its results.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.checkpoint import read_meta  # noqa: E402

BASE = ("--encoder tf_efficientnet_lite0 --decoder-channels 128 64 32 16 16 --size 352 480 --epochs 60 "
        "--freeze-epochs 2 --dice 1.0 --bs 8 --lr 3e-3 --encoder-lr-mult 0.2 --pct-start 0.2 --scale 0.5 2.0 "
        "--lighting 0.3 --colour 0.3 --ema 0.995 --focus-classes Pole SignSymbol Fence Pedestrian Bicyclist "
        "--focus-p 0.5 --half")


@dataclass
class Recipe:
    name: str
    options: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    result: dict = field(default_factory=dict)


def read_recipes(path: Path) -> list[Recipe]:
    recipes, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, options = line.partition(":")
        name = name.strip()
        if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise SystemExit(f"{path}:{n}: expected 'name: options' with a name of letters, digits, '-', '_', "
                             f"'.'; got {line!r}")
        if name in seen:
            raise SystemExit(f"{path}:{n}: recipe {name!r} is named twice")
        seen.add(name)
        recipes.append(Recipe(name, shlex.split(options)))
    if not recipes:
        raise SystemExit(f"{path}: no recipes")
    return recipes


def history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def score(args, recipe: Recipe, out: Path) -> dict:
    """The best checkpoint's scores on the held-out drive at the served size (`python -m training evaluate`)."""
    run_dir = out / recipe.name
    epochs = history(run_dir)
    r = {"recipe": recipe.name, "options": shlex.join(recipe.options), "epochs_done": len(epochs),
         "minutes": round((time.monotonic() - recipe.started) / 60, 1)}
    code = recipe.process.returncode
    if code not in (0, None) and not recipe.result.get("stopped"):
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] if (run_dir / "train.log").is_file() \
            else []
        return {**r, "status": f"failed (exit {code}): {tail[0] if tail else 'no output'}"}
    r["status"] = "stopped at the deadline" if recipe.result.get("stopped") else "done"
    if not epochs or not (out / f"{recipe.name}.safetensors").is_file():
        return {**r, "status": r["status"] + ", no epoch finished"}
    # The checkpoint's own record of the epoch it holds: metrics.jsonl is appended after the checkpoint is written,
    # so a run stopped in between has a best checkpoint one epoch newer than its log says.
    best = read_meta(out / f"{recipe.name}.safetensors").metrics
    r.update(best_epoch=best["epoch"], train_size_miou=round(best["mean_iou"], 4),
             last_miou=round(epochs[-1]["mean_iou"], 4))
    cmd = [sys.executable, "-m", "training", "evaluate", "--data", str(args.data), "--split", "valid",
           "--holdout-drive", args.holdout_drive, "--checkpoint", str(out / f"{recipe.name}.safetensors"),
           "--size", *map(str, args.eval_size), "--workers", str(args.workers), "--json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {**r, "status": r["status"] + f"; evaluate failed: {done.stderr.strip()[-300:]}"}
    m = json.loads(done.stdout)
    r.update(pixel_accuracy=round(m["pixel_accuracy"], 4), miou=round(m["mean_iou"], 4),
             per_class_iou={k: None if v is None else round(v, 3) for k, v in m["per_class_iou"].items()})
    return r


def table(results: list[dict], eval_size: tuple[int, int]) -> str:
    classes = next((list(r["per_class_iou"]) for r in results if "per_class_iou" in r), [])
    size = "×".join(map(str, eval_size))
    head = (f"| recipe | status | best epoch | mIoU at train size | pixel acc. at {size} | mIoU at {size} | "
            + " | ".join(classes) + " | minutes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: -r.get("miou", -1)):
        cells = [r["recipe"], r["status"], r.get("best_epoch", "–"), r.get("train_size_miou", "–"),
                 r.get("pixel_accuracy", "–"), r.get("miou", "–"),
                 *(("–" if r["per_class_iou"][c] is None else r["per_class_iou"][c]) if "per_class_iou" in r
                   else "–" for c in classes), r["minutes"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--recipes", type=Path, default=ROOT / "bench" / "sweep_recipes.txt")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these recipes of the file")
    p.add_argument("--holdout-drive", default="0006R0")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep",
                   help="checkpoints, run directories and the results")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (a GPU host: 3-4)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                   help="DataLoader workers per run")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop the runs still going this many seconds after the start, start no new one after it")
    p.add_argument("--eval-size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"),
                   help="the size the best checkpoints are scored at (the served size)")
    p.add_argument("--base", default=BASE, help="the options every recipe starts from (default: the shipped recipe)")
    p.add_argument("--common", default="", help="options appended to every recipe, e.g. \"--encoder-weights "
                   ".gpu-data/weights/tf_efficientnet_lite0.safetensors --device cuda\"")
    args = p.parse_args()
    recipes = read_recipes(args.recipes)
    if args.only:
        unknown = sorted(set(args.only) - {r.name for r in recipes})
        if unknown:
            raise SystemExit(f"{args.recipes}: no recipe {unknown}; it has {[r.name for r in recipes]}")
        recipes = [r for r in recipes if r.name in args.only]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Runs side by side share the cores: each gets its share of intra-op threads (oversubscribed OpenMP threads
    # spin against each other and slow every run down many times), unless the caller set OMP_NUM_THREADS.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.parallel))))
    (out / "sweep.jsonl").write_text("")
    start = time.monotonic()
    waiting, running, results = list(recipes), [], []

    def launch(recipe: Recipe) -> None:
        options = [*shlex.split(args.base), *recipe.options, *shlex.split(args.common)]
        cmd = [sys.executable, "-m", "training", "train", "--data", str(args.data), "--holdout-drive",
               args.holdout_drive, "--out", str(out / f"{recipe.name}.safetensors"), "--run-dir",
               str(out / recipe.name), "--workers", str(args.workers), *options, "--quiet"]
        (out / recipe.name).mkdir(parents=True, exist_ok=True)
        log = (out / recipe.name / "train.log").open("w")
        print(f"start {recipe.name}: {shlex.join(cmd[2:])}", flush=True)
        recipe.started = time.monotonic()
        recipe.process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        running.append(recipe)

    def finish(recipe: Recipe) -> None:
        running.remove(recipe)
        r = score(args, recipe, out)
        results.append(r)
        with (out / "sweep.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
        write(results)

    def write(results: list[dict]) -> None:
        text = table(results, tuple(args.eval_size))
        (out / "sweep.md").write_text(f"Held-out drive {args.holdout_drive}; base: `{args.base}`; common: "
                                      f"`{args.common}`\n\n{text}\n")
        print(f"\n{text}\n", flush=True)

    while waiting or running:
        late = args.deadline_s is not None and time.monotonic() - start > args.deadline_s
        while waiting and len(running) < args.parallel and not late:
            launch(waiting.pop(0))
        if late and (waiting or any(r.process.poll() is None for r in running)):
            print(f"deadline ({args.deadline_s:.0f} s): stopping {[r.name for r in running]}, not starting "
                  f"{[r.name for r in waiting]}", flush=True)
            results.extend({"recipe": r.name, "options": shlex.join(r.options), "status": "not started",
                            "minutes": 0} for r in waiting)
            waiting.clear()
            for r in running:
                if r.process.poll() is None:
                    r.result["stopped"] = True
                    r.process.terminate()
            for r in running:
                try:
                    r.process.wait(60)
                except subprocess.TimeoutExpired:
                    r.process.kill()
                    r.process.wait()
        for r in [r for r in running if r.process.poll() is not None]:
            finish(r)
        time.sleep(0.5)
    write(results)
    print(f"results: {out / 'sweep.md'}")


if __name__ == "__main__":
    main()
