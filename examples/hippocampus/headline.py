"""The headline of examples/hippocampus/unlabeled.sh: two rows paired by seed, mean ± sample sd and the paired
difference, as Markdown (and JSON with --json).

    python examples/hippocampus/headline.py WORK/scores [--control a] [--treated c_recokd] [--json out.json]
        [--update README.md docs/results.md ...]

Reads the per-row score files the script writes (<row>_s<seed>.json: mean foreground Dice on the held-out cases)
and pairs the rows on the seeds both have; a seed only one of them has is listed but not paired. --update rewrites
the table between the lines MARK_START and MARK_END of each file named (the README and the results pages).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


MARK_START, MARK_END = "<!-- headline:start -->", "<!-- headline:end -->"
# how the pages name the script's rows
ROW_NAMES = {"a": "(a) control, 20 labels", "c_recokd": "(c) ReCo-KD, 20 labels + 146 teacher-labelled",
             "c_student": "(c) pseudo-labels alone, 20 labels + 146 teacher-labelled"}


def load(scores: Path, row: str) -> dict[int, float]:
    """{seed: mean Dice} of one row."""
    found = {}
    for path in sorted(scores.glob(f"{row}_s*.json")):
        record = json.loads(path.read_text())
        if record["row"] == row:
            found[int(record["seed"])] = float(record["dice_mean"])
    return found


def paired(control: dict[int, float], treated: dict[int, float]) -> dict:
    """Per-seed differences on the shared seeds, their mean and sample sd (sd 0 for one seed)."""
    seeds = sorted(set(control) & set(treated))
    diffs = [treated[s] - control[s] for s in seeds]

    def summary(values: list[float]) -> dict:
        return {"mean": statistics.mean(values) if values else None,
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    return {"seeds": seeds, "differences": diffs, "difference": summary(diffs),
            "control": summary([control[s] for s in seeds]), "treated": summary([treated[s] for s in seeds])}


def to_markdown(control_row: str, treated_row: str, control: dict[int, float], treated: dict[int, float]) -> str:
    result = paired(control, treated)
    seeds = sorted(set(control) | set(treated))

    def cell(values: dict[int, float], seed: int) -> str:
        return f"{values[seed]:.4f}" if seed in values else "-"

    def mean_sd(summary: dict, signed: bool = False) -> str:
        if summary["mean"] is None:
            return "-"
        return f"{summary['mean']:{'+' if signed else ''}.4f} ± {summary['sd']:.4f} (n = {summary['n']})"

    name_c, name_t = ROW_NAMES.get(control_row, control_row), ROW_NAMES.get(treated_row, treated_row)
    lines = ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd, paired seeds |",
             "|---|" + "---|" * len(seeds) + "---|",
             f"| {name_c} | " + " | ".join(cell(control, s) for s in seeds) + f" | {mean_sd(result['control'])} |",
             f"| {name_t} | " + " | ".join(cell(treated, s) for s in seeds) + f" | {mean_sd(result['treated'])} |"]
    diff = {s: treated[s] - control[s] for s in result["seeds"]}
    short = lambda row: row.split("_")[0]  # noqa: E731  (a), (c)
    lines.append(f"| ({short(treated_row)}) - ({short(control_row)}), paired | "
                 + " | ".join(f"{diff[s]:+.4f}" if s in diff else "-" for s in seeds)
                 + f" | {mean_sd(result['difference'], signed=True)} |")
    return "\n".join(lines) + "\n"


def update(path: Path, table: str) -> None:
    """Replace the lines between MARK_START and MARK_END in `path` by `table`."""
    text = path.read_text()
    if MARK_START not in text or MARK_END not in text:
        raise SystemExit(f"{path}: no {MARK_START} ... {MARK_END} lines to put the table between")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    path.write_text(f"{head}{MARK_START}\n{table}{MARK_END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="WORK/scores of unlabeled.sh")
    parser.add_argument("--control", default="a")
    parser.add_argument("--treated", default="c_recokd")
    parser.add_argument("--json", type=Path, help="also write the paired numbers here")
    parser.add_argument("--update", type=Path, nargs="+", default=[], help="put the table into these Markdown files")
    args = parser.parse_args(argv)
    control, treated = load(args.scores, args.control), load(args.scores, args.treated)
    table = to_markdown(args.control, args.treated, control, treated)
    print(table, end="")
    for path in args.update:
        update(path, table)
    if args.json:
        args.json.write_text(json.dumps({"control": args.control, "treated": args.treated,
                                         **paired(control, treated)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
