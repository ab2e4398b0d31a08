#!/usr/bin/env python3
"""Checks a run folder's TensorBoard files with TensorBoard's own reader.

    pip install tensorboard
    python3 scripts/check-tensorboard.py RUN [RUN ...]

For each RUN (a `moco pretrain` folder, or a `moco linear-eval` --out folder), loads RUN/tb with
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` (what `tensorboard
--logdir` uses) and compares every scalar with the records it came from: metrics.jsonl's lines
(each number but `epoch` and `step`, at the line's `step`; `event` lines are not curves), or
results.json's `history` for a linear evaluation (at step = epoch). Each step must appear once
per tag with the record's value as a float32. Prints one line per run; exits 1 on a difference.
"""

import json
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator


def expected(run: Path) -> dict:
    """tag -> {step: value} from the run's own records."""
    want: dict = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        rows = [r for r in rows if "event" not in r and "step" in r]
        for r in rows:
            for k, v in r.items():
                if k in ("epoch", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                want.setdefault(k, {})[r["step"]] = float(v)
    else:
        history = json.loads((run / "results.json").read_text())["history"]
        for r in history:
            for k, v in r.items():
                if k != "epoch":
                    want.setdefault(k, {})[r["epoch"]] = float(v)
    return want


def check(run: Path) -> list:
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    want = expected(run)
    problems = []
    tags = set(acc.Tags()["scalars"])
    if tags != set(want):
        problems.append(f"tags {sorted(tags)} != records' {sorted(want)}")
    for tag in sorted(tags & set(want)):
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        if len(steps) != len(set(steps)):
            problems.append(f"{tag}: a step appears twice")
        got = {e.step: e.value for e in events}
        if set(got) != set(want[tag]):
            problems.append(f"{tag}: steps {sorted(got)} != {sorted(want[tag])}")
            continue
        for s, v in want[tag].items():
            if np.float32(v) != np.float32(got[s]) and not (np.isnan(v) and np.isnan(got[s])):
                problems.append(f"{tag} at step {s}: {got[s]} != {v}")
    n = sum(len(v) for v in want.values())
    print(f"{run}: {len(tags)} tags, {n} scalars, " + ("OK" if not problems else f"{len(problems)} problems"))
    return problems


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    bad = False
    for arg in sys.argv[1:]:
        for p in check(Path(arg)):
            print("  " + p)
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
