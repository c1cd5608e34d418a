"""The headline of examples/hippocampus/unlabeled.sh: two rows paired by seed, mean ± sample sd and the paired
difference, as Markdown (and JSON with --json).

    python examples/hippocampus/headline.py SCORES [--control a] [--treated c_recokd] [--json out.json]
        [--import WORK/scores] [--update README.md docs/results.md ...]

Reads the per-row score files the script writes (<row>_s<seed>.json: mean foreground Dice on the held-out cases)
and pairs the rows on the seeds both have; a seed only one of them has is listed but not paired. --import first
copies the script's score files into SCORES (the teacher's path made relative to the shared folder, as committed).
--update rewrites the table between the lines MARK_START and MARK_END of each file named (the README and the
results pages), and the table of every row and seed between ROWS_START and ROWS_END where a file has those lines.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def markers(block: str) -> tuple[str, str]:
    """The lines a Markdown page puts a generated table between: <!-- BLOCK:start --> ... <!-- BLOCK:end -->."""
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


MARK_START, MARK_END = markers("headline")
ROWS_START, ROWS_END = markers("rows")
# how the pages name the script's rows
ROW_NAMES = {"a": "(a) control, 20 labels", "c_recokd": "(c) ReCo-KD, 20 labels + 146 teacher-labelled",
             "c_student": "(c) pseudo-labels alone, 20 labels + 146 teacher-labelled"}
# what each row's student is, for the table of every row (unlabeled.sh's header says how each is made)
ROW_STUDENTS = {
    "a": "control (`nnUNetTrainerStudent`), 20 labelled cases (Dataset104)",
    "b": "`nnUNetTrainerReCoKD`, the 20 labelled cases only (Dataset104)",
    "b_logitkd": "`nnUNetTrainerLogitKD`, the 20 labelled cases only (Dataset104)",
    "c_student": "control trainer on Dataset204: 20 labelled + 146 teacher-labelled (pseudo-labels alone)",
    "c_recokd": "`nnUNetTrainerReCoKD` on Dataset204 (pseudo-labels + MS-SARD/MS-CA with the teacher)",
    "c_logitkd": "`nnUNetTrainerLogitKD` on Dataset204 (pseudo-labels + logit KD)",
    "c_agree": "control trainer on Dataset214: Dataset204's teacher labels, ignored where its 8 mirrorings are not "
               "unanimous (`--min-agreement 1`)",
    "d": "zero labels: all 166 fold-0 training cases teacher-labelled (Dataset304, fold all)",
    "e": "control, all 166 labelled cases (Dataset004)",
    "u_a": "control, 20 labelled cases (Dataset105; held out: 21 of fold 0's validation cases)",
    "u_c": "control trainer on Dataset205: 20 labelled + 21 scans the teacher never saw, teacher-labelled",
    "w8_a": "control, width 1/8, 20 labelled cases (Dataset104)",
    "w8_c": "control trainer, width 1/8, on Dataset204 (pseudo-labels alone)"}


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

    name_c, name_t = row_name(control_row), row_name(treated_row)
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


ROW_SUFFIX = re.compile(r"(?:_k(\d+))?(?:_(\d+)x(\d+))?(?:_lr([0-9.]+))?$")
PROTOCOL_K = 20  # labelled cases of the protocol's rows; unlabeled.sh's K=<k> names its rows <row>_k<k>


def split_row(row: str) -> tuple[str, list[str]]:
    """A row of unlabeled.sh -> (the protocol's row, its settings that are not the protocol's). Suffixes in the
    script's order: _k<k> (labelled cases; see labelled_k), _<epochs>x<iterations> (budget), _lr<rate> (initial
    learning rate), +<name>=<value> (SET):
    "b_logitkd_lr0.023+logit_temperature=1" -> ("b_logitkd", ["initial lr 0.023", "logit_temperature = 1"])."""
    match = _suffixes(row)
    notes = ([f"{match[2]} x {match[3]}"] if match[2] else []) + ([f"initial lr {match[4]}"] if match[4] else [])
    return match.string[:match.start()], notes + set_notes(row)


def _suffixes(row: str) -> re.Match:
    """ROW_SUFFIX matched on a row's name without its SET part."""
    return ROW_SUFFIX.search(row.split("+")[0])


def set_notes(row: str) -> list[str]:
    """The trainer settings unlabeled.sh's SET put into a row's name: "b_logitkd+logit_weight=0.25" ->
    ["logit_weight = 0.25"]."""
    return [s.replace("=", " = ", 1) for s in row.split("+")[1:]]


def labelled_k(row: str) -> int:
    """How many real labelled cases a row's student had: unlabeled.sh's K (rows <row>_k<k>), else the protocol's 20."""
    k = _suffixes(row)[1]
    return int(k) if k else PROTOCOL_K


def _with_k(text: str, k: int) -> str:
    """A row's description (written for k = 20) for k labelled cases: the counts and the datasets unlabeled.sh
    makes for that k (Dataset<600+k>: k labelled; Dataset<700+k>: those + the other 166 - k teacher-labelled)."""
    if k == PROTOCOL_K:
        return text
    for old, new in (("20 labelled", f"{k} labelled"), ("20 labels", f"{k} labels"),
                     ("146 teacher-labelled", f"{166 - k} teacher-labelled"), ("Dataset104", f"Dataset{600 + k}"),
                     ("Dataset204", f"Dataset{700 + k}")):
        text = text.replace(old, new)
    return text


def student_of(row: str) -> str:
    """What a row's student is (its budget, learning rate and settings aside)."""
    base = split_row(row)[0]
    return _with_k(ROW_STUDENTS.get(base, base), labelled_k(row))


def row_name(row: str) -> str:
    """The headline's name of a row, its budget, learning rate and settings added where they are not the protocol's:
    c_student_30x100_lr0.023 -> "(c) pseudo-labels alone, ... (30 x 100, initial lr 0.023)"."""
    base, notes = split_row(row)
    name = _with_k(ROW_NAMES.get(base, base), labelled_k(row))
    return f"{name} ({', '.join(notes)})" if notes else name


def rows_markdown(scores: Path) -> str:
    """Every row and seed of the score files: mean and per-class Dice, training budget and settings, held-out cases."""
    records = [json.loads(p.read_text()) for p in scores.glob("*_s*.json")]
    lines = ["| row | seed | student | epochs x iterations | mean Dice | Dice per class (1 anterior, 2 posterior) "
             "| held-out cases |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["row"], r["seed"])):
        per = ", ".join(f"{k}: {v:.4f}" for k, v in r["dice_per_class"].items())
        budget = f"{r['epochs']} x {r['iterations']}" if "epochs" in r else "not recorded"
        if r.get("initial_lr", 0.01) != 0.01:  # nnU-Net's 0.01 (score files from before the field: 0.01)
            budget += f", initial lr {r['initial_lr']:g}"
        budget += "".join(f", {note}" for note in set_notes(r["row"]))  # only the row's name records them
        lines.append(f"| {r['row']} | {r['seed']} | {student_of(r['row'])} | {budget} | {r['dice_mean']:.4f} "
                     f"| {per} | {r['held_out_cases']} |")
    return "\n".join(lines) + "\n"


def import_scores(source: Path, scores: Path) -> list[str]:
    """Copy unlabeled.sh's score files into `scores`, the teacher's path relative to the shared folder."""
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
    parser.add_argument("scores", type=Path, help="score files (unlabeled.sh's or the committed copy)")
    parser.add_argument("--import", dest="source", type=Path, help="first copy unlabeled.sh's WORK/scores into SCORES")
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
