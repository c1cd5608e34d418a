"""`nnunetv2_recokd benchmark`: what distillation adds to one nnU-Net training step.

For each setting (a U-Net size and patch) and each trainer, one full train_step (teacher forward,
student forward, seg loss, distillation terms, backward, optimizer step) is timed against the floor
that no distillation method can beat: a plain student step (nnUNetTrainerStudent, same width) plus
one teacher forward. Reported: ms per step, ratio to the floor, peak memory (CUDA) and its ratio, and
the inference latency of teacher and student on one patch. A second measurement isolates the ReCo-KD
terms (MS-SARD + MS-CA with adapters, every encoder stage with a deep-supervision target, forward and
backward) and compares them with the same terms computed directly by the formulas
(ReCoStageLoss.reference): time, bytes the terms keep alive for backward (any device) and peak
memory above the features (CUDA). No data loading or augmentation is timed:
batches are synthetic tensors of nnU-Net's shapes, the teacher has random weights (cost does not
depend on the weights). Networks run eagerly (nnUNet_compile=f) for every trainer so that the ratio
compares like with like. Every timing is evaluation/timing.py's median_ms; the table is evaluation/tables.py's
benchmark_table.

Settings: `hippocampus` (default) and `unet6_128` are built in and need no file; `plans` takes the 3d_fullres
configuration of a dataset's nnUNetPlans.json given with --plans. A run with a low-dose trainer uses a CT-normalised
copy of the plans (the simulated dose degrades CT channels), one with a modality-dropout trainer a two-channel copy
(dropout blanks one of several channels); time those separately to keep the others' floor on the plans as given.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.config import default_settings
from nnunetv2_recokd.evaluation.networks import no_grad_forward
from nnunetv2_recokd.evaluation.tables import benchmark_table
from nnunetv2_recokd.evaluation.timing import device_name, median_ms, peak_above_current
from nnunetv2_recokd.trainer_names import PUBLIC_TRAINERS

DEFAULT_TRAINERS = ("nnUNetTrainerLogitKD", "nnUNetTrainerReCoKD", "nnUNetTrainerReCoKDGraph", "nnUNetTrainerGraphKD")
DEFAULT_SETTINGS = ("hippocampus",)


def distillation_trainers() -> list[str]:
    """The public trainers that distil (the plain student and teacher trainers have nothing to benchmark)."""
    return [name for name in PUBLIC_TRAINERS
            if not name.startswith("nnUNetTrainerStudent") and name != "nnUNetTrainerTeacher"]


def check_trainers(trainers: Sequence[str]) -> None:
    """SystemExit naming the valid trainers when any name is not a distillation trainer."""
    valid = distillation_trainers()
    unknown = [name for name in trainers if name not in valid]
    if unknown:
        raise SystemExit(f"unknown --trainers {', '.join(unknown)}; valid (the distillation trainers): "
                         f"{', '.join(valid)}")


def settings_catalogue(plans_file: Optional[str]) -> dict[str, Callable[[], dict]]:
    """Setting name -> plans builder. Only `plans` reads a file (plans_file); the others are built in."""
    def hippocampus() -> dict:
        # the architecture of nnU-Net 2.8's 3d_fullres plans for Dataset004_Hippocampus (Medical Segmentation
        # Decathlon Task04; numbers copied from its nnUNetPlans.json): PlainConvUNet, features 32-64-128-256,
        # strides 1-2-2-2, kernels 3^3, 2 convs per stage, patch 40 x 56 x 40, batch 7
        return sandbox.unet_plans((32, 64, 128, 256), (40, 56, 40), batch_size=7)

    def unet6() -> dict:
        return sandbox.unet_plans((32, 64, 128, 256, 320, 320), (128, 128, 128), batch_size=2)

    def from_plans() -> dict:
        return read_plans(plans_file)

    return {"hippocampus": hippocampus, "unet6_128": unet6, "plans": from_plans}


def read_plans(plans_file: Optional[str]) -> dict:
    """A dataset's nnUNetPlans.json reduced to its 3d_fullres configuration, in the sandbox's folder tree."""
    if not plans_file:
        raise SystemExit("--setting plans needs --plans FILE: the nnUNetPlans.json of your dataset (in "
                         "$nnUNet_preprocessed/<Dataset>/ or a model folder); built-in settings: hippocampus, "
                         "unet6_128")
    path = Path(plans_file)
    if not path.is_file():
        raise SystemExit(f"--plans {path}: file not found")
    try:
        plans = json.loads(path.read_text())
        config = plans["configurations"]["3d_fullres"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--plans {path}: not nnU-Net plans with a 3d_fullres configuration "
                         f"({type(e).__name__}: {e})") from e
    plans["configurations"] = {"3d_fullres": config}
    plans["dataset_name"] = sandbox.SANDBOX_DATASET  # the sandbox's folder tree
    return plans


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def run_setting(name: str, plans: dict, trainers: Sequence[str], device: torch.device, steps: int,
                warmup: int, terms_only: bool = False, teachers: Sequence[int] = (1,), terms: bool = True,
                on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """Training steps against the floor, latency and the distillation terms alone (terms_only: the terms only;
    terms=False: no terms alone, only the steps).

    teachers: numbers of teachers to time each trainer with (random teachers of the setting's plans, one student):
    each count N has its own floor, a plain student step plus N teacher forwards, timed together. The top-level
    floor keys are those of the first count; "floors" holds one entry per count and each trainer row its count.
    on_row(partial result) is called after every timed trainer, so a caller can keep what was measured when a
    later trainer fails or a time limit ends the run.
    """
    if not teachers or any(n < 1 for n in teachers):
        raise SystemExit(f"--teachers takes counts >= 1, got {list(teachers)}")
    import nnunetv2_recokd.trainers as public

    check_trainers(trainers)
    settings = [default_settings(getattr(public, t)) for t in trainers]
    if any(s.lowdose_probability > 0 for s in settings):
        plans = as_ct_plans(plans)  # the simulated low dose needs a CT-normalised channel to degrade
    if any(s.modality_dropout > 0 for s in settings) and _channels(plans) < 2:
        plans = with_channels(plans, 2)  # modality dropout blanks one of several channels
    cfg = plans["configurations"]["3d_fullres"]
    patch, batch_size = cfg["patch_size"], cfg["batch_size"]
    n_stages = len(cfg["architecture"]["arch_kwargs"]["features_per_stage"])
    header = {"setting": name, "device": device_name(device), "patch_size": patch, "batch_size": batch_size,
              "n_stages": n_stages, "channels": _channels(plans)}
    alone = {}
    if terms or terms_only:
        alone = {"reco_terms": reco_loss_cost(plans, device, steps, warmup),
                 "graph_terms": graph_loss_cost(plans, device, steps, warmup)}
    if terms_only:
        return {**header, "trainers": [], **alone}
    rows, floors = [], []
    with sandbox_session(plans, max(teachers)) as session:
        batch = session.batch(device)
        teacher_net = session.trainer("nnUNetTrainerLogitKD", device).teacher.network
        latency = _inference_latency(session.trainer("nnUNetTrainerStudent", device).network, teacher_net.network,
                                     batch["data"][:1], device, steps, warmup)
        for count in teachers:
            session.use_teachers(count)
            teacher_nets = session.trainer("nnUNetTrainerLogitKD", device).teachers if count > 1 else [teacher_net]
            floor = {"teachers": count, **_measure_floor(session.trainer("nnUNetTrainerStudent", device),
                                                         [t.network for t in teacher_nets], batch, device,
                                                         steps, warmup)}
            del teacher_nets
            floors.append(floor)
            for cls_name in trainers:
                t = session.trainer(cls_name, device)
                loaded = len(t.teachers)  # the count it really distils from (a row of N teachers must use N)
                ms, peak = median_ms(partial(t.train_step, batch), device, steps, warmup)
                del t
                rows.append({"trainer": cls_name, "teachers": count, "teachers_loaded": loaded, "ms_per_step": ms,
                             "ratio_to_floor": ms / floor["floor_ms"], "peak_gib": peak,
                             "peak_ratio": (peak / floor["floor_peak_gib"])
                             if peak is not None and floor["floor_peak_gib"] else None})
                if on_row is not None:
                    on_row({**header, "floors": floors, "trainers": rows, **latency})
    first = {k: v for k, v in floors[0].items() if k != "teachers"}
    return {**header, **first, "floors": floors, "trainers": rows, **latency, **alone}


class SandboxSession:
    """What a benchmark run shares inside sandbox_session: the plans, random teachers on disk, trainers built the
    way nnUNetv2_train builds them (initialized, warm-ups finished) and nnU-Net-shaped batches."""

    def __init__(self, root: Path, plans: dict, dataset: dict, teacher_folders: list[str]):
        self.root, self.plans, self.dataset, self.teacher_folders = root, plans, dataset, teacher_folders

    def use_teachers(self, count: int) -> None:
        """Trainers built from now on distil from the first `count` random teachers."""
        os.environ["RECOKD_TEACHER"] = os.pathsep.join(self.teacher_folders[:count])

    def batch(self, device: torch.device) -> dict:
        cfg = self.plans["configurations"]["3d_fullres"]
        n_stages = len(cfg["architecture"]["arch_kwargs"]["features_per_stage"])
        return sandbox.make_batch(cfg["patch_size"], cfg["batch_size"], n_stages - 1, device=device,
                                  channels=_channels(self.plans))

    def trainer(self, cls_name: str, device: torch.device, config: Optional[dict] = None):
        """An initialized trainer in training mode at its last epoch (every term at full weight). config: settings
        (RECOKD_CONFIG keys) for this trainer only, on top of the session's."""
        import nnunetv2_recokd.trainers as public

        saved = os.environ["RECOKD_CONFIG"]
        try:
            if config:
                own = self.root / f"config_{cls_name}.json"
                own.write_text(json.dumps({**json.loads(Path(saved).read_text()), **config}))
                os.environ["RECOKD_CONFIG"] = str(own)
            with _quiet():
                t = sandbox.make_trainer(getattr(public, cls_name), self.plans, self.dataset, device)
                t.initialize()
        finally:
            os.environ["RECOKD_CONFIG"] = saved
        t.current_epoch = t.num_epochs - 1  # warm-ups finished: every term at full weight
        t.network.train()
        return t


@contextlib.contextmanager
def sandbox_session(plans: dict, n_teachers: int = 1) -> Iterator[SandboxSession]:
    """A temporary nnU-Net folder tree with `n_teachers` random teachers of the plans (the first one in use) and
    the benchmark's settings; every nnUNet_* and RECOKD_* variable is restored on exit."""
    dataset = sandbox.dataset_json(channels=_channels(plans))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        saved_env = dict(os.environ)
        try:
            sandbox.prepare_folders(root, plans)
            os.environ["nnUNet_compile"] = "f"
            teacher_folders = [str(sandbox.write_random_teacher(root / f"teacher_{i}" / "model", plans, dataset,
                                                                seed=i)) for i in range(n_teachers)]
            (root / "bench.json").write_text(json.dumps({"graph_lesion_labels": [2],
                                                         "graph_min_component_voxels": 1}))
            os.environ["RECOKD_CONFIG"] = str(root / "bench.json")
            session = SandboxSession(root, plans, dataset, teacher_folders)
            session.use_teachers(1)
            yield session
        finally:
            os.environ.clear()
            os.environ.update(saved_env)


def _channels(plans: dict) -> int:
    return len(plans["configurations"]["3d_fullres"]["normalization_schemes"])


def with_channels(plans: dict, n: int) -> dict:
    """A copy of the plans with n input channels (the first channel's normalisation and statistics repeated)."""
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"]["3d_fullres"]
    for key in ("normalization_schemes", "use_mask_for_norm"):
        cfg[key] = [cfg[key][min(c, len(cfg[key]) - 1)] for c in range(n)]
    props = plans["foreground_intensity_properties_per_channel"]
    plans["foreground_intensity_properties_per_channel"] = {str(c): props.get(str(c), props["0"]) for c in range(n)}
    return plans


def as_ct_plans(plans: dict) -> dict:
    """A copy of the plans whose input channels are CT-normalised (HU statistics of soft tissue in air), so the
    low-dose trainers find a CT channel; the synthetic batches then read as HU = 300 x value + 40."""
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"]["3d_fullres"]
    cfg["normalization_schemes"] = ["CTNormalization"] * len(cfg["normalization_schemes"])
    plans["foreground_intensity_properties_per_channel"] = {
        str(c): {"mean": 40.0, "std": 300.0, "median": 40.0, "min": -1024.0, "max": 3000.0,
                 "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}
        for c in range(len(cfg["normalization_schemes"]))}
    return plans


def _measure_floor(control, teacher_nets: Sequence[torch.nn.Module], batch: dict, device: torch.device, steps: int,
                   warmup: int) -> dict:
    """The floor no distillation step can beat: a plain student step plus one forward of every teacher."""
    def teacher_forward():
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            for teacher_net in teacher_nets:
                teacher_net(batch["data"])

    def floor_step():
        teacher_forward()
        control.train_step(batch)

    student_ms, _ = median_ms(partial(control.train_step, batch), device, steps, warmup)
    teacher_ms, _ = median_ms(teacher_forward, device, steps, warmup)
    floor_ms, floor_peak = median_ms(floor_step, device, steps, warmup)
    return {"student_step_ms": student_ms, "teacher_forward_ms": teacher_ms, "floor_ms": floor_ms,
            "floor_peak_gib": floor_peak}


def _inference_latency(student: torch.nn.Module, teacher: torch.nn.Module, patch: torch.Tensor,
                       device: torch.device, steps: int, warmup: int) -> dict:
    out = {}
    for name, net in (("teacher", teacher), ("student", student)):
        net.eval()
        net.decoder.deep_supervision = False
        out[f"{name}_inference_ms"], _ = median_ms(partial(no_grad_forward, net, patch), device, steps, warmup)
        out[f"{name}_params"] = sum(p.numel() for p in net.parameters())
    return out


def _stage_tensors(plans: dict, settings, device: torch.device, levels: Optional[Sequence[int]] = None):
    """(C_s, C_t, student, teacher, target) per stage level with a deep-supervision target (default: all).

    Random features of the stage's shape (fp16 on CUDA, as nnU-Net's autocast makes them; float32 elsewhere),
    the student at the settings' width, the synthetic target subsampled to the stage's resolution.
    """
    from nnunetv2_recokd.student import scaled_features

    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    teacher_channels = arch["features_per_stage"]
    student_channels = scaled_features(teacher_channels, settings.student_width, settings.student_min_channels)
    levels = range(len(teacher_channels) - 1) if levels is None else levels  # the bottleneck has no DS target
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    seg = sandbox.make_batch(cfg["patch_size"], cfg["batch_size"], 1)["target"][0]
    out, shape = [], list(cfg["patch_size"])
    for k in range(max(levels) + 1):
        shape = [size // stride for size, stride in zip(shape, arch["strides"][k])]
        if k not in levels:
            continue
        index = torch.meshgrid(*[torch.linspace(0, n - 1, m).round().long() for n, m in zip(seg.shape[2:], shape)],
                               indexing="ij")
        target = seg[(slice(None), slice(None), *index)].to(device)
        c_s, c_t = student_channels[k], teacher_channels[k]
        student = torch.randn(cfg["batch_size"], c_s, *shape, generator=g).to(device, dtype).requires_grad_()
        teacher = torch.randn(cfg["batch_size"], c_t, *shape, generator=g).to(device, dtype)
        out.append((c_s, c_t, student, teacher, target))
    return out


def reco_loss_cost(plans: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """ReCo-KD terms alone, ours (ReCoStageLoss) and direct (ReCoStageLoss.reference), forward + backward.

    Features are random tensors of the setting's stage shapes (fp16 on CUDA, as nnU-Net's autocast makes
    them; float32 on the CPU), the student at the shipped width, masks from the synthetic target.
    """
    from nnunetv2_recokd.config import default_settings
    from nnunetv2_recokd.distiller import reco_stage_loss
    from nnunetv2_recokd.losses import region_masks

    settings = default_settings("nnUNetTrainerReCoKD")
    stages = []
    for c_s, c_t, student, teacher, target in _stage_tensors(plans, settings, device):
        module = reco_stage_loss(settings, c_s, c_t, target.ndim - 2).to(device)
        stages.append({"module": module, "student": student, "teacher": teacher,
                       "masks": region_masks(target, num_classes=3)})
    alive = [t for st in stages for t in (st["student"], st["teacher"], *st["masks"], *st["module"].parameters())]

    def run(direct: bool) -> torch.Tensor:
        total = 0
        for st in stages:
            terms = (st["module"].reference if direct else st["module"])(st["student"], st["teacher"], *st["masks"])
            total = total + terms["sard"] + terms["ca"]
        return total

    out = {"stages": len(stages)}
    for name, direct in (("ours", False), ("direct", True)):
        def step() -> None:
            run(direct).backward()
            for st in stages:
                st["student"].grad = None
                st["module"].zero_grad(set_to_none=True)

        out[f"{name}_ms"], _ = median_ms(step, device, steps, warmup)
        with _SavedBytes(alive) as saved:
            loss = run(direct)
        out[f"{name}_saved_mib"] = saved.total / 2 ** 20
        del loss
        out[f"{name}_peak_mib"] = peak_above_current(step, device)
    return out


def graph_loss_cost(plans: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """Region-graph terms alone on nnUNetTrainerReCoKDGraph's stages, forward + backward, everything included:
    regions from the target (label 2 split into connected components), masked pooling, node/edge terms and the
    per-sample GW solves."""
    from nnunetv2_recokd.config import default_settings
    from nnunetv2_recokd.distiller import region_graph_loss
    from nnunetv2_recokd.losses.graph import extract_regions

    settings = default_settings("nnUNetTrainerReCoKDGraph")
    levels = [int(name[3:]) for name in settings.graph_stages]  # dec{k}: the resolution of encoder stage k
    stages = []
    for c_s, c_t, student, teacher, target in _stage_tensors(plans, settings, device, levels):
        module = region_graph_loss(settings, c_s, c_t)
        stages.append({"module": module.to(device), "student": student, "teacher": teacher, "target": target})

    def step() -> None:
        total = 0
        for st in stages:
            regions = extract_regions(st["target"], [2], 1, settings.graph_background_node)
            total = total + st["module"](st["student"], st["teacher"], regions)["total"]
        total.backward()
        for st in stages:
            st["student"].grad = None
            st["module"].zero_grad(set_to_none=True)

    ms, _ = median_ms(step, device, steps, warmup)
    nodes = [len(r) for st in stages for r in extract_regions(st["target"], [2], 1, settings.graph_background_node)]
    return {"stages": list(settings.graph_stages), "ms": ms, "nodes_per_graph": nodes,
            "peak_mib": peak_above_current(step, device)}


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the block, except `alive` ones."""

    def __init__(self, alive: list[torch.Tensor]):
        self._alive = {t.untyped_storage().data_ptr() for t in alive}
        self._seen: set[int] = set()
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._alive and storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return tensor

    def __enter__(self) -> "_SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def run(settings: Sequence[str], trainers: Sequence[str], device: str, steps: int, warmup: int,
        plans_file: Optional[str], json_out: Optional[str], md_out: Optional[str], terms_only: bool = False,
        teachers: Sequence[int] = (1,)) -> str:
    """Run the benchmark, write --json/--md when given and return the Markdown; every argument problem is a
    SystemExit before anything is timed."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train runs its steps (autotuned in the warm-up steps)
    catalogue = settings_catalogue(plans_file)
    unknown = [s for s in settings if s not in catalogue]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; valid: {', '.join(catalogue)}")
    if plans_file and "plans" not in settings:
        raise SystemExit("--plans is only read by --setting plans; add `--setting plans`")
    check_trainers(trainers)
    if not teachers or any(n < 1 for n in teachers):
        raise SystemExit(f"--teachers takes counts >= 1, got {list(teachers)}")
    built = {name: catalogue[name]() for name in settings}  # a bad --plans stops here, before any timing
    results = []
    for name in settings:
        print(f"[benchmark] {name} on {dev} ...", flush=True)
        results.append(run_setting(name, built[name], trainers, dev, steps, warmup, terms_only, teachers))
    text = benchmark_table(results)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1))
    if md_out:
        Path(md_out).write_text(text)
    return text
