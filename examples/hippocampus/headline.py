"""The headline of examples/hippocampus/protocol.py: two rows paired by seed, mean ± sample sd and the paired
difference, as Markdown (and JSON with --json).

    python examples/hippocampus/headline.py SCORES [--control a] [--treated c_recokd] [--json out.json]
        [--import WORK/scores] [--update README.md docs/results.md ...]

Reads the per-row score files the protocol writes (<row>_s<seed>.json: mean foreground Dice on the held-out cases,
the row's fields and settings) and pairs the rows on the seeds both have; a seed only one of them has is listed but
not paired. Rows are named and described by protocol.py's table and their budget and settings read from the score
files' fields, never parsed from the rows' names. --import first copies the protocol's score files into SCORES (the
teacher's path made relative to the shared folder, as committed).
--update rewrites the table between the lines MARK_START and MARK_END of each file named (the README and the
results pages), and the table of every row and seed between ROWS_START and ROWS_END where a file has those lines.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import PROTOCOL_BUDGET, ROWS, notes  # noqa: E402  (examples/ is not a package)


def markers(block: str) -> tuple[str, str]:
    """The lines a Markdown page puts a generated table between: <!-- BLOCK:start --> ... <!-- BLOCK:end -->."""
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


MARK_START, MARK_END = markers("headline")
ROWS_START, ROWS_END = markers("rows")


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

    name_c, name_t = row_title(control_row), row_title(treated_row)
    lines = ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd, paired seeds |",
             "|---|" + "---|" * len(seeds) + "---|",
             f"| {name_c} | " + " | ".join(cell(control, s) for s in seeds) + f" | {mean_sd(result['control'])} |",
             f"| {name_t} | " + " | ".join(cell(treated, s) for s in seeds) + f" | {mean_sd(result['treated'])} |"]
    diff = {s: treated[s] - control[s] for s in result["seeds"]}
    lines.append(f"| {tag(treated_row)} - {tag(control_row)}, paired | "
                 + " | ".join(f"{diff[s]:+.4f}" if s in diff else "-" for s in seeds)
                 + f" | {mean_sd(result['difference'], signed=True)} |")
    return "\n".join(lines) + "\n"


def row_title(row: str) -> str:
    """The pages' name of a row (protocol.py's label and what is not the protocol's): "(a) control, 20 labels"."""
    return ROWS[row].title if row in ROWS else row


def tag(row: str) -> str:
    """The letter of a row's label, "(c)", or the row's name where its label has none."""
    label = ROWS[row].label if row in ROWS else ""
    return label.split(" ")[0] if label.startswith("(") else row


def rows_markdown(scores: Path) -> str:
    """Every row and seed of the score files: mean and per-class Dice, training budget and settings, held-out cases."""
    records = [json.loads(p.read_text()) for p in scores.glob("*_s*.json")]
    lines = ["| row | seed | student | epochs x iterations | mean Dice | Dice per class (1 anterior, 2 posterior) "
             "| held-out cases |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["row"], r["seed"])):
        per = ", ".join(f"{k}: {v:.4f}" for k, v in r["dice_per_class"].items())
        budget = ", ".join([f"{r['epochs']} x {r['iterations']}", *notes(r["row_settings"], *PROTOCOL_BUDGET)])
        student = ROWS[r["row"]].description if r["row"] in ROWS else f"`{r['trainer']}` on {r['dataset']}"
        lines.append(f"| {r['row']} | {r['seed']} | {student} | {budget} | {r['dice_mean']:.4f} "
                     f"| {per} | {r['held_out_cases']} |")
    return "\n".join(lines) + "\n"


def import_scores(source: Path, scores: Path) -> list[str]:
    """Copy the protocol's score files into `scores`, the teacher's path relative to the shared folder."""
    copied = []
    for path in sorted(source.glob("*_s*.json")):
        text = path.read_text()
        if not text.strip():
            continue  # a row whose scoring was interrupted
        record = json.loads(text)
        cases = record.get("training_cases") or {}
        if cases.get("teacher"):
            cases["teacher"] = re.sub(r"^.*/shared/", "../shared/", cases["teacher"])
        (scores / path.name).write_text(json.dumps(record) + "\n")
        copied.append(path.name)
    return copied


def update(path: Path, table: str, start: str = MARK_START, end: str = MARK_END, required: bool = True) -> None:
    """Replace the lines between `start` and `end` in `path` by `table` (a file without them: an error if
    `required`, else unchanged)."""
    text = path.read_text()
    if start not in text or end not in text:
        if required:
            raise SystemExit(f"{path}: no {start} ... {end} lines to put the table between")
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{table}{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="score files (the protocol's or the committed copy)")
    parser.add_argument("--import", dest="source", type=Path, help="first copy the protocol's WORK/scores into SCORES")
    parser.add_argument("--control", default="a")
    parser.add_argument("--treated", default="c_recokd")
    parser.add_argument("--json", type=Path, help="also write the paired numbers here")
    parser.add_argument("--update", type=Path, nargs="+", default=[], help="put the table into these Markdown files")
    parser.add_argument("--block", default="headline",
                        help="the table goes between <!-- BLOCK:start --> and <!-- BLOCK:end --> (default: headline; "
                             "another block, e.g. a pair at another learning rate, is required in every file)")
    args = parser.parse_args(argv)
    if args.source:
        args.scores.mkdir(parents=True, exist_ok=True)
        print(f"imported {len(import_scores(args.source, args.scores))} score files from {args.source}")
    control, treated = load(args.scores, args.control), load(args.scores, args.treated)
    table = to_markdown(args.control, args.treated, control, treated)
    print(table, end="")
    every_row = rows_markdown(args.scores)
    for path in args.update:
        update(path, table, *markers(args.block))
        update(path, every_row, ROWS_START, ROWS_END, required=False)
    if args.json:
        args.json.write_text(json.dumps({"control": args.control, "treated": args.treated,
                                         **paired(control, treated)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
