"""`nnunetv2_recokd gpu-check`: what only a GPU can show, in one command and one JSON file (examples/gpu_check.sh).

Parts, each in a child process of its own with its own time limit, so a part that fails, hangs or runs out of
memory loses nothing the others measured (the JSON is rewritten after every part, and a part writes what it has
measured so far while it runs, so even a part stopped by its limit keeps its finished rows):

- benchmark/<setting>: `nnunetv2_recokd benchmark` of every distillation trainer at the setting (unet6_128,
  hippocampus): ms per step, ratio to the floor (plain student step + teacher forward), peak GPU memory and its
  ratio to the floor's, the terms alone and the inference latency. Trainers with modality dropout need two input
  channels, so they are timed in a second run on a two-channel copy of the plans, against that run's own floor.
- teachers/<setting>: the ensemble trainers with 1, 2 and 5 teachers, each count against its own floor (student
  step + that many teacher forwards), as `benchmark --teachers 1 2 5` times them.
- lowdose: one training step of nnUNetTrainerStudent_lowDose and nnUNetTrainerReCoKD_lowDose beside their
  full-dose counterparts, on the benchmark's CT-normalised copy of the plans, every sample degraded
  (lowdose_probability 1: the step's worst case; shipped 0.5); a forward hook on the student records whether
  the step ran under CUDA autocast, its dtype and that the student's input was degraded.
- training: a short real `nnUNetv2_train ... -tr nnUNetTrainerReCoKD` on a small synthetic dataset (planned by
  nnUNetv2_plan_and_preprocess), teacher with random weights of the dataset's plans (cost does not depend on
  the weights), nnUNet_compile left unset so nnU-Net decides about torch.compile: whether it finished, its
  seconds and the lines nnU-Net logged about compile.

--quick: tiny plans and one or two steps per part, for a CPU rehearsal (the tests run it); with --device cpu
the figures only CUDA gives (peak memory, autocast) are reported as skipped, the code paths still run.
Every nnU-Net folder lives in a temporary work folder; the user's nnUNet_* folders are never read or written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nnunetv2_recokd.evaluation import benchmark
from nnunetv2_recokd.evaluation.summary import summary_mean_dice, validation_summary
from nnunetv2_recokd.evaluation.tables import benchmark_table
from nnunetv2_recokd.evaluation.timing import Stopwatch, cpu_cores, median_ms

NO_CUDA = "skipped: no CUDA"
# README's GPU targets for a distillation step: time and peak memory relative to the floor
TARGET_RATIO, TARGET_PEAK_RATIO = 1.10, 1.15
ENSEMBLE_TRAINERS = ("nnUNetTrainerLogitKD_ensemble", "nnUNetTrainerReCoKD_ensemble")
# each low-dose trainer beside the trainer it adds the simulated dose to
LOWDOSE_PAIRS = (("nnUNetTrainerStudent", "nnUNetTrainerStudent_lowDose"),
                 ("nnUNetTrainerReCoKD", "nnUNetTrainerReCoKD_lowDose"))
TRAINING_TRAINER = "nnUNetTrainerReCoKD"
TAIL = 3000  # characters of a log or traceback kept in the JSON


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What each part runs. Limits are seconds per part; FULL's add up to less than its budget, so every part gets
    its whole limit even when the ones before it run to theirs."""

    benchmark_settings: tuple[str, ...]
    teacher_settings: tuple[str, ...]
    lowdose_settings: tuple[str, ...]
    steps: int
    warmup: int
    teacher_counts: tuple[int, ...]
    train_cases: int  # >= 5: nnU-Net's 5-fold split
    train_size: int
    train_epochs: int
    train_iterations: int
    limits: dict[str, int]
    budget: int

    def parts(self) -> list[str]:
        return ([f"benchmark/{s}" for s in self.benchmark_settings] + [f"teachers/{s}" for s in self.teacher_settings]
                + ["lowdose", "training"])

    def limit(self, part: str) -> int:
        return self.limits.get(part, self.limits.get(part.split("/")[0], 60))


# 8 minutes on one H100 with the machine's start and set-up: the parts get 430 s, the parent's own work a few
# seconds. unet6_128 first: the README's GPU targets are stated on it.
FULL = Schedule(benchmark_settings=("unet6_128", "hippocampus"), teacher_settings=("hippocampus", "unet6_128"),
                lowdose_settings=("unet6_128", "hippocampus"), steps=6, warmup=2, teacher_counts=(1, 2, 5),
                train_cases=8, train_size=48, train_epochs=2, train_iterations=20,
                limits={"benchmark/unet6_128": 130, "benchmark/hippocampus": 55, "teachers/hippocampus": 40,
                        "teachers/unet6_128": 60, "lowdose": 45, "training": 100}, budget=440)
QUICK = Schedule(benchmark_settings=("tiny",), teacher_settings=("tiny",), lowdose_settings=("tiny",), steps=1,
                 warmup=1, teacher_counts=(1, 2, 5), train_cases=5, train_size=32, train_epochs=1,
                 train_iterations=2, limits={"benchmark": 120, "teachers": 120, "lowdose": 120, "training": 240},
                 budget=900)


def schedule_for(quick: bool) -> Schedule:
    return QUICK if quick else FULL


# ---------------------------------------------------------------------------------------------------------- parent

def run_all(out: Path, device: str, quick: bool, parts: Sequence[str], budget: int, keep_work: bool) -> int:
    """Run every part in a child process under its limit and write the JSON after each; 0 when all are ok."""
    schedule = schedule_for(quick)
    start = time.time()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "what": "nnunetv2_recokd gpu-check: benchmark of every distillation trainer, 1/2/5 teachers, low-dose steps "
                "under autocast, a short real nnUNetv2_train",
        "command": " ".join(sys.argv), "mode": "quick" if quick else "full", "requested_device": device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget, "work": None,
        "schedule": dataclasses.asdict(schedule), **environment(device),
        "parts": {p: {"status": "pending"} for p in parts}}
    _write_json(out, report)
    if device == "cuda" and not report["cuda_available"]:
        for p in parts:
            report["parts"][p] = {"status": "failed", "error": "--device cuda requested but torch sees no CUDA device"}
        report["seconds"] = time.time() - start
        _write_json(out, report)
        print(f"[gpu-check] no CUDA device; wrote {out}", flush=True)
        return 1
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report["work"] = str(work)
    env = _child_env(work)
    (work / "logs").mkdir()
    for part in parts:
        left = budget - (time.time() - start)
        limit = int(min(schedule.limit(part), left))
        if limit < 10:
            report["parts"][part] = {"status": "skipped", "reason": f"budget of {budget} s spent"}
            continue
        print(f"[gpu-check] {part} (limit {limit} s) ...", flush=True)
        entry = report["parts"][part] = run_child(part, device, quick, work, env, limit)
        print(f"[gpu-check] {part}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        report["seconds"] = time.time() - start
        _write_json(out, report)
        if entry.get("stopped"):  # this command was told to stop: the JSON keeps what is done, nothing more runs
            for rest in parts[parts.index(part) + 1:]:
                report["parts"][rest] = {"status": "skipped", "reason": "not run: the command was stopped"}
            break
    report["seconds"] = time.time() - start
    _write_json(out, report)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
        report["work"] = None
        _write_json(out, report)
    print(f"[gpu-check] wrote {out} ({report['seconds']:.0f} s)", flush=True)
    if any(p.get("stopped") for p in report["parts"].values()):
        return 128 + signal.SIGTERM
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


def run_child(part: str, device: str, quick: bool, work: Path, env: dict, limit: int) -> dict:
    """One part in a child process group, stopped (with everything it started) at `limit` seconds."""
    name = part.replace("/", "_")
    part_out, log = work / f"{name}.json", work / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "nnunetv2_recokd.cli", "gpu-check", "--part", part, "--part-out", str(part_out),
           "--work", str(work / name), "--device", device] + (["--quick"] if quick else [])
    start = time.time()
    timed_out, stopped = False, None
    with open(log, "w") as f:
        # a session of its own: at the limit the whole group goes, nnUNetv2_train and its workers included
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        # the child's own session does not get the signals sent to ours: stopping this command stops the part too
        previous = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            code = proc.returncode
        except (SystemExit, KeyboardInterrupt) as e:
            _kill_group(proc)
            code, stopped = proc.returncode, e
        finally:
            signal.signal(signal.SIGTERM, previous)
    seconds = time.time() - start
    record = _read_json(part_out) or {}
    entry: dict[str, Any] = {"status": record.get("status", "failed"), "seconds": seconds, "limit_s": limit}
    if "result" in record:
        entry["result"] = record["result"]
    if stopped is not None:
        entry.update(status="failed", error=f"stopped from outside ({type(stopped).__name__} {stopped}) after "
                                            f"{seconds:.0f} s", partial=bool(record.get("result")), stopped=True)
    elif timed_out:
        entry["status"] = "failed"
        entry["error"] = f"timed out after {limit} s" + ("; the result holds what it measured before" if
                                                          record.get("result") else "")
        entry["partial"] = bool(record.get("result"))
    elif entry["status"] != "ok":
        entry["status"] = "failed"
        entry["error"] = record.get("error") or f"exited with code {code} before writing its result"
        entry["partial"] = bool(record.get("result"))
    if entry["status"] != "ok":
        entry["log_tail"] = _tail(log)
    return entry


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the leader may be gone while a grandchild (a data-loader worker) still holds the group; the next part starts
    # when the group is gone (on a GPU: its memory released), or after 10 s at most (a zombie nobody reaps stays)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)


def _child_env(work: Path) -> dict:
    """The parts' environment: nnU-Net's folders in the work folder, no settings of the user's distillation runs;
    nnUNet_compile unset (the benchmark sets it for its eager steps; the training leaves it to nnU-Net)."""
    env = dict(os.environ)
    for name in ("raw", "preprocessed", "results"):
        env[f"nnUNet_{name}"] = str(work / "nnunet" / name)
    for key in ("RECOKD_TEACHER", "RECOKD_CONFIG", "nnUNet_compile"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def environment(device: str) -> dict:
    """Versions, and the device as the driver names it (nvidia-smi: no CUDA context in the parent)."""
    import torch

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
                     "nnunetv2_recokd": version("nnunetv2-recokd"),
                     "dynamic_network_architectures": version("dynamic_network_architectures"),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None},
        "cuda_available": cuda, "cpu": cpu_cores()}
    info["device_name"] = f"CPU ({os.cpu_count()} cores)" if device == "cpu" else None
    if device == "cuda" and shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()]
            info["gpus"] = gpus
            info["device_name"] = gpus[0].split(",")[0] if gpus else None
        except (OSError, subprocess.SubprocessError) as e:
            info["gpus"] = f"nvidia-smi failed: {e}"
    return info


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a reader (or a kill) never sees half a file


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------------- child

def run_part(part: str, device: str, schedule: Schedule, out: Path, work: Path) -> int:
    """Run one part in this process; its JSON holds what it has measured so far at every point."""
    import torch

    work.mkdir(parents=True, exist_ok=True)
    if schedule is QUICK and device == "cpu":
        # a rehearsal beside other work on a small CPU: one thread per op stalls less than threads waiting for a
        # busy core (the figures of a rehearsal only need to exist and be positive)
        torch.set_num_threads(1)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train runs its steps (autotuned in the warm-up steps)
    kind, _, setting = part.partition("/")
    functions: dict[str, Callable[..., dict]] = {"benchmark": part_benchmark, "teachers": part_teachers,
                                                 "lowdose": part_lowdose, "training": part_training}
    state: dict[str, Any] = {"status": "running"}

    def save(result: dict) -> None:
        state["result"] = result
        _write_json(out, state)

    save({})
    try:
        if kind not in functions:
            raise SystemExit(f"unknown part {part}")
        result = functions[kind](setting, torch.device(device), schedule, work, save)
    except BaseException as e:  # SystemExit of the benchmark's checks included: the parent reports it
        state.update(status="failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-TAIL:]}")
        _write_json(out, state)
        traceback.print_exc()
        return 1
    state["status"] = "ok"
    save(result)
    return 0


def _plans(setting: str) -> dict:
    from nnunetv2_recokd import sandbox

    if setting == "tiny":  # --quick: 3 stages (the region-graph terms need dec1), 16^3, batch 2
        return sandbox.unet_plans((16, 32, 64), (16, 16, 16), batch_size=2)
    return benchmark.settings_catalogue(None)[setting]()


def _needs_two_channels(trainer: str) -> bool:
    from nnunetv2_recokd.config import default_settings

    return default_settings(trainer).modality_dropout > 0


def benchmark_trainers() -> list[str]:
    """Every distillation trainer, the benchmark's defaults first (a part stopped by its limit keeps those)."""
    rest = [t for t in benchmark.distillation_trainers() if t not in benchmark.DEFAULT_TRAINERS]
    return list(benchmark.DEFAULT_TRAINERS) + rest


def _rows(runs: list[dict], cuda: bool) -> list[dict]:
    """One flat row per timed trainer (and teacher count) over the runs, with the README's targets on CUDA."""
    rows = []
    for run in runs:
        for r in run.get("trainers", []):
            row = {k: r[k] for k in ("trainer", "teachers", "ms_per_step", "ratio_to_floor", "peak_gib", "peak_ratio")}
            row["channels"] = run.get("channels", 1)
            floor = next(f for f in run["floors"] if f["teachers"] == r["teachers"])
            row["floor_ms"], row["floor_peak_gib"] = floor["floor_ms"], floor["floor_peak_gib"]
            row["meets_targets"] = (r["ratio_to_floor"] <= TARGET_RATIO and r["peak_ratio"] <= TARGET_PEAK_RATIO
                                    if cuda and r["peak_ratio"] is not None else None)
            rows.append(row)
    return rows


def _timed_runs(setting: str, groups: list[list[str]], device, schedule: Schedule, save: Callable[[dict], None],
                teachers: Sequence[int] = (1,), terms: bool = True) -> dict:
    """benchmark.run_setting once per trainer group; saves after every timed trainer."""
    plans, runs, cuda = _plans(setting), [], device.type == "cuda"

    def result(current: Optional[dict] = None) -> dict:
        done = runs + ([current] if current else [])
        out = {"setting": setting, "steps": schedule.steps, "warmup": schedule.warmup, "rows": _rows(done, cuda),
               "runs": done}
        if cuda:
            out["targets"] = {"ratio_to_floor_max": TARGET_RATIO, "peak_ratio_max": TARGET_PEAK_RATIO}
        else:
            out["skipped"] = {"peak_memory": NO_CUDA, "targets": NO_CUDA}
        return out

    for i, group in enumerate(g for g in groups if g):
        runs.append(benchmark.run_setting(setting, plans, group, device, schedule.steps, schedule.warmup,
                                          teachers=teachers, terms=terms and i == 0,
                                          on_row=lambda partial: save(result(partial))))
        save(result())
    final = result()
    final["markdown"] = benchmark_table(runs)
    return final


def part_benchmark(setting: str, device, schedule: Schedule, work: Path, save: Callable[[dict], None]) -> dict:
    """Every distillation trainer at one setting; trainers with modality dropout on a two-channel copy."""
    trainers = benchmark_trainers()
    return _timed_runs(setting, [[t for t in trainers if not _needs_two_channels(t)],
                                 [t for t in trainers if _needs_two_channels(t)]], device, schedule, save)


def part_teachers(setting: str, device, schedule: Schedule, work: Path, save: Callable[[dict], None]) -> dict:
    """The ensemble trainers with 1, 2 and 5 teachers, each count against its own floor."""
    return _timed_runs(setting, [list(ENSEMBLE_TRAINERS)], device, schedule, save, teachers=schedule.teacher_counts,
                       terms=False)


def part_lowdose(setting: str, device, schedule: Schedule, work: Path, save: Callable[[dict], None]) -> dict:
    """One training step of each low-dose trainer and its full-dose counterpart per setting."""
    cuda = device.type == "cuda"
    out: dict[str, Any] = {"lowdose_probability": 1.0, "steps": schedule.steps, "warmup": schedule.warmup,
                           "settings": {}}
    if not cuda:
        out["skipped"] = {"cuda_autocast": f"{NO_CUDA} (nnU-Net steps a CPU without autocast; so did this run)",
                          "peak_memory": NO_CUDA}
    for setting_name in schedule.lowdose_settings:
        plans = benchmark.as_ct_plans(_plans(setting_name))  # the low dose degrades CT-normalised channels
        rows: list[dict] = []
        out["settings"][setting_name] = {"rows": rows}
        with benchmark.sandbox_session(plans) as session:
            batch = session.batch(device)
            for pair in LOWDOSE_PAIRS:
                for name in pair:
                    config = {"lowdose_probability": 1.0} if name.endswith("_lowDose") else None
                    rows.append(lowdose_step(session.trainer(name, device, config), batch, device, schedule))
                    save(out)
                full, low = (next(r for r in rows if r["trainer"] == n) for n in pair)
                full_ms = full["ms_per_step"]
                low["ms_added_by_lowdose"] = low["ms_per_step"] - full_ms
                low["ratio_to_full_dose"] = low["ms_per_step"] / full_ms
                save(out)
    return out


def lowdose_step(trainer, batch: dict, device, schedule: Schedule) -> dict:
    """Time train_step; a forward hook on the student records autocast, dtypes and whether its input was
    degraded (differs from the clean batch) at every step."""
    import torch

    clean = batch["data"].to(device)
    calls: list[dict] = []

    def record(module, args, output) -> None:
        x = args[0]
        first = output[0] if isinstance(output, (list, tuple)) else output
        autocast, dtype = _autocast_state(device.type)
        calls.append({"autocast": autocast, "autocast_dtype": dtype,
                      "input_dtype": str(x.dtype).replace("torch.", ""),
                      "output_dtype": str(first.dtype).replace("torch.", ""),
                      "degraded": x.shape != clean.shape or not torch.equal(x.float(), clean.float())})

    handle = trainer.network.register_forward_hook(record)
    try:
        ms, peak = median_ms(lambda: trainer.train_step(batch), device, schedule.steps, schedule.warmup)
        loss = float(trainer.train_step(batch)["loss"])
    finally:
        handle.remove()
    row = {"trainer": trainer.__class__.__name__, "ms_per_step": ms, "peak_gib": peak, "loss": loss,
           "loss_finite": bool(torch.isfinite(torch.tensor(loss))), "steps_seen": len(calls),
           "autocast_every_step": all(c["autocast"] for c in calls),
           "input_degraded_every_step": all(c["degraded"] for c in calls),
           "input_degraded_any_step": any(c["degraded"] for c in calls),
           **{k: calls[-1][k] for k in ("autocast_dtype", "input_dtype", "output_dtype")}}
    return row


def _autocast_state(device_type: str) -> tuple[bool, Optional[str]]:
    """(autocast on, its dtype) for the device type; the per-device-type API is torch >= 2.4's, older torch only
    answers for CUDA."""
    import torch

    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
        dtype = torch.get_autocast_gpu_dtype()
    return enabled, str(dtype).replace("torch.", "") if enabled else None


def part_training(setting: str, device, schedule: Schedule, work: Path, save: Callable[[dict], None]) -> dict:
    """Plan a small synthetic dataset and train nnUNetTrainerReCoKD on it through nnUNetv2_train, compile left to
    nnU-Net; the teacher has random weights of the dataset's own plans."""
    from nnunetv2_recokd import sandbox
    from nnunetv2_recokd.nnunet_commands import nnunet_command
    from nnunetv2_recokd.synthetic import write_dataset

    env = dict(os.environ)
    for name in ("raw", "preprocessed", "results"):  # this part's own folders, whatever the caller set
        env[f"nnUNet_{name}"] = str(work / name)
    env.pop("nnUNet_compile", None)  # left to nnU-Net: its default compiles on CUDA
    env.pop("RECOKD_TEACHER", None)
    if device.type == "cpu":  # export in-process: no worker processes to start on a small CPU
        env["nnUNet_def_n_proc"] = "1"
    out: dict[str, Any] = {"trainer": TRAINING_TRAINER, "device": device.type, "cases": schedule.train_cases,
                           "size": schedule.train_size, "epochs": schedule.train_epochs,
                           "iterations_per_epoch": schedule.train_iterations, "nnUNet_compile": "unset",
                           "teacher": "random weights of the dataset's plans", "finished": False}
    folder = write_dataset(work / "raw", 990, num_train=schedule.train_cases, size=schedule.train_size, seed=0)
    dataset_id = "990"
    processes = "1" if device.type == "cpu" else "4"
    with Stopwatch() as planning:
        _logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "3d_fullres", "-np",
                 processes, "-npfp", processes], env, work / "plan.log")
    out["plan_seconds"] = planning.seconds
    save(out)

    pre = work / "preprocessed" / folder.name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset = json.loads((pre / "dataset.json").read_text())
    teacher = sandbox.write_random_teacher(work / "teacher", plans, dataset)
    config = work / "recokd.json"
    config.write_text(json.dumps({"num_epochs": schedule.train_epochs,
                                  "num_iterations_per_epoch": schedule.train_iterations,
                                  "num_val_iterations_per_epoch": 1, "save_every": schedule.train_epochs,
                                  "seed": 0, "teacher": str(teacher)}))
    log = work / "train.log"
    train_env = {**env, "RECOKD_CONFIG": str(config)}
    if device.type == "cpu":  # in-process augmentation (0 breaks plan_and_preprocess, so set for training only)
        train_env["nnUNet_n_proc_DA"] = "0"
    with Stopwatch() as training:
        code = _logged([nnunet_command("nnUNetv2_train"), dataset_id, "3d_fullres", "0", "-tr", TRAINING_TRAINER,
                        "-device", device.type], train_env, log, check=False)
    out["seconds"] = training.seconds
    text = log.read_text(errors="replace")
    fold = work / "results" / folder.name / f"{TRAINING_TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    out.update(exit_code=code, finished=code == 0 and (fold / "checkpoint_final.pth").is_file(),
               compile_log=[line.strip() for line in text.splitlines() if "compile" in line.lower()],
               epoch_seconds=[float(line.split("Epoch time:")[1].split()[0]) for line in text.splitlines()
                              if "Epoch time:" in line])
    validation = summary_mean_dice(validation_summary(fold.parent, 0))
    if validation is not None:
        out["validation_mean_dice"] = validation
    if device.type != "cuda":
        out["skipped"] = {"torch_compile": f"{NO_CUDA} (nnU-Net compiles only on CUDA)"}
    save(out)
    if not out["finished"]:
        raise RuntimeError(f"nnUNetv2_train exited with {code}; last lines:\n{text[-TAIL:]}")
    return out


def _logged(cmd: list[str], env: dict, log: Path, check: bool = True) -> int:
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if check and code != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {code}; last lines:\n{_tail(log)}")
    return code
