"""Deployment: stock model export (+ zip, ONNX), the runtime predictor inside nnU-Net's pipeline, bad inputs.

The student folders here hold random weights (sandbox.write_random_student): a random U-Net gives a noisy label map
with every class in it, so "identical predictions" and "Dice >= 0.999" compare two computations voxel by voxel,
which a trained, mostly-background student would do far less strictly. nnU-Net's real preprocessing, sliding
window and export run on small synthetic images (24^3, patch 16^3: 8 windows per case). PyTorch's prediction of
the two-fold ensemble with mirroring is made once (fixture torch_reference) and every other path is compared with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.deploy.export import STOCK_TRAINER, build_stock_network, export_stock_model, write_install_zip
from nnunetv2_recokd.deploy.modelfolder import DeployError, open_model_folder
from nnunetv2_recokd.deploy.inputfolder import check_input_folder
from nnunetv2_recokd.deploy.predictor import build_predictor, dice_per_class, predict_cases
from nnunetv2_recokd.deploy.runtime import compile_network, export_onnx
from nnunetv2_recokd.synthetic import make_case
from tests.tiny_nnunet import BLOCKER

PATCH = (16, 16, 16)
STUDENT = "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    """ONNX exports cached in a temporary folder, never in the user's ~/.cache."""
    old = os.environ.get("RECOKD_CACHE")
    os.environ["RECOKD_CACHE"] = str(tmp_path_factory.mktemp("onnx_cache"))
    yield Path(os.environ["RECOKD_CACHE"])
    if old is None:
        del os.environ["RECOKD_CACHE"]
    else:
        os.environ["RECOKD_CACHE"] = old


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """results/Dataset991_Sandbox/<student folder> (folds 0, 1) and an input folder of 3 cases."""
    root = tmp_path_factory.mktemp("deploy")
    plans, dataset = sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json()
    results = root / "results"
    student = sandbox.write_random_student(results / sandbox.SANDBOX_DATASET / STUDENT, plans, dataset,
                                           folds=(0, 1))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        image, _ = make_case(rng, 24, 0.15)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(images / f"case_{i:03d}_0000.nii.gz"))
    return root, results, student, images


@pytest.fixture(scope="module")
def torch_reference(world, tmp_path_factory):
    """PyTorch's predictions (folds 0 and 1 ensembled, mirroring on) through our predictor with --runtime torch."""
    _, _, student, images = world
    model = open_model_folder(student)
    out = tmp_path_factory.mktemp("torch_reference")
    timings = predict_cases(build_predictor(model, "torch", True, 0.5), check_input_folder(images, model.dataset_json),
                            out, log=lambda m: None)
    assert [t.case for t in timings] == ["case_000", "case_001"]
    return _labels(out)


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


# ----------------------------------------------------------------------------------------------- export
def test_export_writes_the_student_architecture_under_a_stock_trainer(world, tmp_path):
    _, _, student, _ = world
    model = open_model_folder(student)
    assert model.folds == [0, 1] and model.trainer_name == "nnUNetTrainerReCoKD" and model.is_student
    result = export_stock_model(model, tmp_path)
    folder = tmp_path / sandbox.SANDBOX_DATASET / f"{STOCK_TRAINER}__nnUNetPlans_ReCoKD__3d_fullres"
    assert result.folder == folder and result.plans_name == "nnUNetPlans_ReCoKD"
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    # (16, 32, 64) at width 1/4 with at least 8 channels: 4 -> 8, 8, 16
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 8, 16]
    assert "recokd_student" not in config and plans["plans_name"] == "nnUNetPlans_ReCoKD"
    assert config["data_identifier"] == "nnUNetPlans_3d_fullres"  # same preprocessing as the source
    for fold in (0, 1):
        exported = torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)
        source = torch.load(student / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)
        assert exported["trainer_name"] == "nnUNetTrainer"
        assert "optimizer_state" not in exported and "recokd" not in exported  # weights only
        assert exported["init_args"]["configuration"] == "3d_fullres"
        assert exported["inference_allowed_mirroring_axes"] == (0, 1, 2)
        for key, value in source["network_weights"].items():
            assert torch.equal(exported["network_weights"][key], value)
    # stock nnU-Net's network from the exported plans computes what the student computes
    stock, channels = build_stock_network(plans, model.dataset_json, "3d_fullres")
    stock.load_state_dict(torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
                          ["network_weights"])
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD

    pm = PlansManager(model.plans)
    ours = nnUNetTrainerReCoKD.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, False)
    ours.load_state_dict(torch.load(student / "fold_0" / "checkpoint_final.pth", weights_only=False)
                         ["network_weights"])
    x = torch.randn(1, channels, *PATCH)
    with torch.no_grad():
        assert torch.equal(stock.eval()(x), ours.eval()(x))


def test_export_refuses_a_folder_that_is_not_a_student(world, tmp_path):
    plans, dataset = sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json()
    teacher = sandbox.write_random_teacher(tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset)
    with pytest.raises(DeployError, match="not an nnunetv2-recokd student"):
        export_stock_model(open_model_folder(teacher), tmp_path / "out")
    assert not (tmp_path / "out" / sandbox.SANDBOX_DATASET).exists() or \
        not any((tmp_path / "out" / sandbox.SANDBOX_DATASET).iterdir())


def test_missing_checkpoint_names_what_the_fold_has(world, tmp_path):
    _, _, student, _ = world
    with pytest.raises(DeployError, match=r"fold 3: .* does not exist .*not trained"):
        open_model_folder(student, ["0", "3"])
    with pytest.raises(DeployError, match=r"\(this fold has checkpoint_latest.pth: choose one with -chk\)"):
        copy = tmp_path / STUDENT
        (copy / "fold_0").mkdir(parents=True)
        for name in ("plans.json", "dataset.json"):
            (copy / name).write_bytes((student / name).read_bytes())
        (copy / "fold_0" / "checkpoint_latest.pth").write_bytes((student / "fold_0" / "checkpoint_final.pth")
                                                                .read_bytes())
        open_model_folder(copy, ["0"])
    with pytest.raises(DeployError, match="not an nnU-Net model folder"):
        open_model_folder(tmp_path / "nowhere")


def test_fold_all_is_used_only_when_named_as_nnunet_does(world, tmp_path):
    _, _, student, _ = world
    copy = tmp_path / STUDENT
    shutil.copytree(student, copy)
    shutil.copytree(copy / "fold_1", copy / "fold_all")
    assert open_model_folder(copy).folds == [0, 1]  # nnUNetPredictor.auto_detect_available_folds skips fold_all
    assert open_model_folder(copy, ["all"]).folds == ["all"]
    for fold in (0, 1):
        shutil.rmtree(copy / f"fold_{fold}")
    with pytest.raises(DeployError, match=r"fold_all, which is used only when named \(-f all\)"):
        open_model_folder(copy)


def test_student_inputs_of_a_model_reading_every_channel_says_so(world, tmp_path, capsys):
    from nnunetv2_recokd.cli import main

    _, _, student, images = world
    assert main(["student-inputs", "-m", str(student), "-i", str(images), "-o", str(tmp_path / "out")]) == 1
    assert "reads every channel of its dataset" in capsys.readouterr().err


def test_failed_export_leaves_nothing_and_existing_target_is_kept(world, tmp_path):
    _, _, student, _ = world
    broken = tmp_path / "src" / STUDENT
    sandbox.write_random_student(broken, sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json(),
                                 folds=(0, 1))
    checkpoint = torch.load(broken / "fold_1" / "checkpoint_final.pth", weights_only=False)
    checkpoint["network_weights"].pop(next(iter(checkpoint["network_weights"])))
    torch.save(checkpoint, broken / "fold_1" / "checkpoint_final.pth")
    out = tmp_path / "out"
    with pytest.raises(DeployError, match="fold 1: the weights do not fit"):
        export_stock_model(open_model_folder(broken), out)
    assert list((out / sandbox.SANDBOX_DATASET).iterdir()) == []  # no staging folder, no half export
    export_stock_model(open_model_folder(student), out)
    with pytest.raises(DeployError, match="exists"):
        export_stock_model(open_model_folder(student), out)
    export_stock_model(open_model_folder(student), out, overwrite=True)


def test_install_zip_layout(world, tmp_path):
    _, _, student, _ = world
    result = export_stock_model(open_model_folder(student), tmp_path / "res", onnx=True, zip_file=tmp_path / "m.zip")
    names = zipfile.ZipFile(result.zip_file).namelist()
    prefix = f"{sandbox.SANDBOX_DATASET}/nnUNetTrainer__nnUNetPlans_ReCoKD__3d_fullres/"
    assert sorted(names) == sorted(prefix + n for n in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth",
                                                        "fold_1/checkpoint_final.pth"))
    assert not list(tmp_path.glob("*.partial"))
    assert write_install_zip(result.folder, tmp_path / "again.zip").is_file()


def test_onnx_export_matches_pytorch_and_takes_any_batch(world, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, _, student, _ = world
    result = export_stock_model(open_model_folder(student), tmp_path, onnx=True)
    assert [p.name for p in result.onnx_files] == ["checkpoint_final.onnx", "checkpoint_final.onnx"]
    assert result.onnx_max_difference < 1e-4
    plans = json.loads((result.folder / "plans.json").read_text())
    network, _ = build_stock_network(plans, sandbox.dataset_json(), "3d_fullres")
    network.load_state_dict(torch.load(result.folder / "fold_1" / "checkpoint_final.pth", weights_only=False)
                            ["network_weights"])
    session = ort.InferenceSession(str(result.folder / "fold_1" / "checkpoint_final.onnx"))
    x = torch.randn(2, 1, *PATCH)
    (out,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = network.eval()(x).numpy()
    assert out.shape == (2, 3, *PATCH)
    assert np.abs(out - expected).max() < 1e-4


# ----------------------------------------------------------------------------------------------- runtimes
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_compiled_network_equals_pytorch_and_returns_fresh_tensors(runtime):
    pytest.importorskip(runtime)
    torch.manual_seed(0)
    plans = sandbox.unet_plans((8, 16, 32), PATCH)
    network, _ = build_stock_network(plans, sandbox.dataset_json(), "3d_fullres")
    compiled = compile_network(network, (1, 1, *PATCH), runtime)
    x1, x2 = torch.randn(1, 1, *PATCH), torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        y1, y2 = network(x1), network(x2)
    first = compiled(x1)
    second = compiled(x2)
    assert (first - y1).abs().max() < 1e-4 and (second - y2).abs().max() < 1e-4
    assert (first - y1).abs().max() < 1e-4  # the second call did not overwrite the first result
    with pytest.raises(DeployError, match="compiled for input"):
        compiled(torch.randn(1, 1, 8, 16, 16))


def test_bf16_is_openvino_only_and_stays_close():
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    network, _ = build_stock_network(sandbox.unet_plans((8, 16, 32), PATCH), sandbox.dataset_json(), "3d_fullres")
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        expected = network.eval()(x)
    # bf16 keeps 8 bits of mantissa: on this network's O(1) logits the mean error stays below 0.02 (measured
    # about 0.005 where the CPU computes in bf16; 0 where it has no bf16 units and OpenVINO stays in f32)
    error = (compile_network(network, x.shape, "openvino", precision="bf16")(x) - expected).abs()
    assert error.mean() < 0.02 and error.max() < 0.25
    with pytest.raises(DeployError, match="bf16 and int8 \\(openvino\\)"):
        compile_network(network, x.shape, "onnxruntime", precision="bf16")
    with pytest.raises(DeployError, match="precision 'fp8'"):
        compile_network(network, x.shape, "openvino", precision="fp8")


def test_missing_runtime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(DeployError, match=r"pip install 'nnunetv2-recokd\[deploy\]'"):
        compile_network(torch.nn.Identity(), (1, 1, *PATCH), "openvino")
    monkeypatch.delitem(sys.modules, "onnx", raising=False)  # not installed at all: looked up, not imported
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    with pytest.raises(DeployError, match=r"package 'onnx'.*pip install"):
        compile_network(torch.nn.Identity(), (1, 1, *PATCH), "onnxruntime")


def test_onnx_export_refuses_deep_supervision(tmp_path):
    plans = sandbox.unet_plans((8, 16, 32), PATCH)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    network = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    with pytest.raises(DeployError, match="deep supervision"):
        export_onnx(network, (1, 1, *PATCH), tmp_path / "x.onnx")


# ----------------------------------------------------------------------------------------------- predictor
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_runtime_prediction_matches_pytorch_through_nnunet_pipeline(world, torch_reference, tmp_path, runtime):
    """Two folds (ensemble) with mirroring: the runtime's label maps agree with PyTorch's (Dice >= 0.999 per class);
    each case is timed; the staging folder is gone."""
    pytest.importorskip(runtime)
    _, _, student, images = world
    model = open_model_folder(student)
    cases = check_input_folder(images, model.dataset_json)
    predictor = build_predictor(model, runtime, True, 0.5)
    assert len(predictor.fold_networks) == 2
    timings = predict_cases(predictor, cases, tmp_path / runtime, log=lambda m: None)
    assert [t.case for t in timings] == ["case_000", "case_001"]
    assert all(t.network_s > 0 and t.total_s >= t.network_s for t in timings)
    ours, theirs = _labels(tmp_path / runtime), torch_reference
    assert sorted(ours) == sorted(theirs) == ["case_000.nii.gz", "case_001.nii.gz"]
    for name in ours:
        assert set(np.unique(theirs[name])) == {0, 1, 2}  # a noisy map: every class present, a strict comparison
        assert min(dice_per_class(ours[name], theirs[name], [1, 2]).values()) >= 0.999
    assert not (tmp_path / runtime / ".recokd_partial").exists()


def test_onnx_export_is_cached_per_checkpoint(world, tmp_path, monkeypatch):
    """The second load reuses the export; a checkpoint written again (new modification time) is exported anew."""
    from nnunetv2_recokd.deploy import runtime as runtime_module

    _, _, student, _ = world
    copy = tmp_path / STUDENT
    sandbox.write_random_student(copy, sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json())
    model = open_model_folder(copy)
    calls = []
    export = runtime_module.export_onnx
    monkeypatch.setattr(runtime_module, "export_onnx", lambda *a, **k: (calls.append(1), export(*a, **k)))
    cache = tmp_path / "cache"
    build_predictor(model, "onnxruntime", True, 0.5, cache_dir=cache)
    assert len(calls) == 1 and len(list((cache / "onnx").glob("*.onnx"))) == 1
    build_predictor(model, "onnxruntime", True, 0.5, cache_dir=cache)
    assert len(calls) == 1  # reused
    checkpoint = copy / "fold_0" / "checkpoint_final.pth"
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    build_predictor(model, "onnxruntime", True, 0.5, cache_dir=cache)
    assert len(calls) == 2 and len(list((cache / "onnx").glob("*.onnx"))) == 2
    build_predictor(model, "onnxruntime", True, 0.5, cache_dir=cache, use_cache=False)
    assert len(calls) == 3


def _shapes(network: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def test_trainer_lookup_builds_known_networks_from_the_plans(world, monkeypatch, tmp_path):
    """For nnU-Net's stock trainer and ours, nnU-Net's trainer-folder walk is skipped and the network is built from
    the plans: the same network the trainer class builds; a student folder whose plans lack the recorded width
    falls back to its trainer class."""
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD

    walked = []
    original = nnunet_predict.recursive_find_trainer_class_by_name
    monkeypatch.setattr(nnunet_predict, "recursive_find_trainer_class_by_name",
                        lambda name, *a: (walked.append(name), original(name, *a))[1])
    patched = nnunet_predict.recursive_find_trainer_class_by_name
    _, _, student, _ = world
    predictor = build_predictor(open_model_folder(student, ["0"]), "torch", False, 0.5)
    assert walked == [] and predictor.trainer_name == "nnUNetTrainerReCoKD"
    by_class = nnUNetTrainerReCoKD.build_network_architecture(predictor.plans_manager,
                                                              predictor.configuration_manager, 1, 3, False)
    assert _shapes(predictor.network) == _shapes(by_class)
    assert _shapes(predictor.network)["encoder.stages.0.0.convs.0.conv.weight"] == (8, 1, 3, 3, 3)  # width 1/4
    assert nnunet_predict.recursive_find_trainer_class_by_name is patched  # restored after loading

    unrecorded = tmp_path / STUDENT
    shutil.copytree(student, unrecorded)
    plans = json.loads((unrecorded / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"]["recokd_student"]
    (unrecorded / "plans.json").write_text(json.dumps(plans))
    fallback = build_predictor(open_model_folder(unrecorded, ["0"]), "torch", False, 0.5)
    assert _shapes(fallback.network) == _shapes(by_class)  # the class's default width is the recorded one

    plans, dataset = sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json()
    teacher = sandbox.write_random_teacher(tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset)
    stock = build_predictor(open_model_folder(teacher, ["0"]), "torch", False, 0.5)
    assert walked == []
    assert _shapes(stock.network) == _shapes(nnUNetTrainer.build_network_architecture(
        stock.plans_manager, stock.configuration_manager, 1, 3, False))


def test_predicting_does_not_import_nnunets_trainer_module_nor_onnx(world):
    """Our predict command imports neither nnU-Net's trainer module (and with it matplotlib and seaborn) nor, once
    the export is cached, onnx: about 0.7 s and 0.3-0.5 s of every command's start on the 2-core machine."""
    _, _, student, _ = world
    build_predictor(open_model_folder(student, ["0"]), "onnxruntime", False, 0.5)  # the export cached (RECOKD_CACHE)
    code = ("import sys\n"
            "from nnunetv2_recokd.deploy.modelfolder import open_model_folder\n"
            "from nnunetv2_recokd.deploy.predictor import build_predictor\n"
            "build_predictor(open_model_folder(sys.argv[1], ['0']), 'onnxruntime', False, 0.5)\n"
            "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith(('nnunetv2.training.nnUNetTrainer',"
            " 'seaborn', 'nnunetv2_recokd.trainers', 'onnx.'))))\n")
    done = subprocess.run([sys.executable, "-c", code, str(student)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_torch_runtime_equals_stock_predictor(world, torch_reference, tmp_path):
    """--runtime torch is nnU-Net's own predictor: identical label maps, so comparisons are like for like."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _, _, student, images = world
    stock = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(student), (0, 1), "checkpoint_final.pth")
    (tmp_path / "stock").mkdir()
    stock.predict_from_files_sequential(str(images), str(tmp_path / "stock"))
    stock_labels, ours = _labels(tmp_path / "stock"), torch_reference
    assert sorted(stock_labels) == sorted(ours) and len(ours) == 2
    for name in ours:
        assert np.array_equal(stock_labels[name], ours[name])


def test_input_folder_problems_are_reported_at_once(tmp_path):
    dataset = {**sandbox.dataset_json(), "channel_names": {"0": "T1", "1": "T2"}}
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz", "c_0001.nii.gz",
                 "c_0002.nii.gz", "scan.nii.gz", "notes.txt"):
        (folder / name).touch()
    with pytest.raises(DeployError) as info:
        check_input_folder(folder, dataset)
    message = str(info.value)
    assert "2 channel(s) (0000 T1, 0001 T2)" in message
    assert "b: missing channel(s) 0001" in message
    assert "c: channel(s) 0002 not in the model's dataset.json" in message
    assert "scan.nii.gz: not named <case>_XXXX.nii.gz" in message
    assert "a:" not in message and "notes.txt" not in message
    with pytest.raises(DeployError, match="no .nii.gz files"):
        check_input_folder(tmp_path, dataset)
    with pytest.raises(DeployError, match="does not exist"):
        check_input_folder(tmp_path / "nope", dataset)


def test_predict_command_in_process_and_with_nnunet_workers(world, tmp_path):
    """The command's default (one process, --timings) and nnU-Net's worker pipeline (-npp/-nps) give the same files."""
    from nnunetv2_recokd.cli import main

    _, _, student, images = world
    common = ["-i", str(images), "-m", str(student), "-f", "0", "--disable_tta", "--runtime", "openvino"]
    assert main(["predict", *common, "-o", str(tmp_path / "seq"), "--timings", str(tmp_path / "t.json")]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "mp"), "-npp", "1", "-nps", "1"]) == 0
    timings = json.loads((tmp_path / "t.json").read_text())
    assert timings["runtime"] == "openvino" and timings["folds"] == [0] and timings["tta"] is False
    assert [c["case"] for c in timings["cases"]] == ["case_000", "case_001"] and timings["setup_s"] > 0
    sequential, workers = _labels(tmp_path / "seq"), _labels(tmp_path / "mp")
    assert sorted(sequential) == sorted(workers) == ["case_000.nii.gz", "case_001.nii.gz"]
    for name in sequential:
        assert np.array_equal(sequential[name], workers[name])


def test_predict_command_writes_nothing_on_bad_input(world, tmp_path):
    from nnunetv2_recokd.cli import main

    _, _, student, images = world
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_0001.nii.gz").write_bytes((images / "case_000_0000.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert main(["predict", "-i", str(bad), "-o", str(out), "-m", str(student)]) == 1
    assert not out.exists()
    assert main(["predict", "-i", str(images), "-o", str(out), "-m", str(student), "-f", "7"]) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- stock nnU-Net

def _nnunet(args: list[str], env: dict) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_stock_nnunet_predicts_the_export_without_this_package(world, tmp_path):
    """nnUNetv2_predict (stock, in a process where nnunetv2_recokd cannot be imported) on the exported folder and on
    the zip installed into another results folder gives exactly the original student folder's predictions."""
    _, results, student, images = world
    export_stock_model(open_model_folder(student), results, zip_file=tmp_path / "student.zip", overwrite=True)
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(tmp_path / "raw"),
           "nnUNet_preprocessed": str(tmp_path / "pre"), "nnUNet_npp": "0", "nnUNet_nps": "0",
           "nnUNet_compile": "f", "nnUNet_def_n_proc": "1"}
    bin_dir = Path(sys.executable).parent
    predict = str(bin_dir / "nnUNetv2_predict")
    common = ["-i", str(images), "-d", "991", "-c", "3d_fullres", "-f", "0", "1", "-device", "cpu",
              "--disable_progress_bar", "--disable_tta"]
    _nnunet([predict, *common, "-o", str(tmp_path / "original"), "-tr", "nnUNetTrainerReCoKD"], env)

    blocked_dir = tmp_path / "blocked"
    blocked_dir.mkdir()
    (blocked_dir / "sitecustomize.py").write_text(BLOCKER)
    blocked = {**env, "PYTHONPATH": str(blocked_dir)}
    probe = subprocess.run([sys.executable, "-c", "import nnunetv2_recokd"], env=blocked, capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'nnunetv2_recokd'" in probe.stderr  # the block is real
    _nnunet([predict, *common, "-o", str(tmp_path / "exported"), "-tr", "nnUNetTrainer", "-p", "nnUNetPlans_ReCoKD"],
            blocked)
    installed = tmp_path / "results2"
    installed.mkdir()
    _nnunet([str(bin_dir / "nnUNetv2_install_pretrained_model_from_zip"), str(tmp_path / "student.zip")],
            {**blocked, "nnUNet_results": str(installed)})
    _nnunet([predict, *common, "-o", str(tmp_path / "from_zip"), "-tr", "nnUNetTrainer", "-p", "nnUNetPlans_ReCoKD"],
            {**blocked, "nnUNet_results": str(installed)})

    original = _labels(tmp_path / "original")
    assert len(original) == 2
    for other in ("exported", "from_zip"):
        labels = _labels(tmp_path / other)
        assert sorted(labels) == sorted(original)
        for name in original:
            assert np.array_equal(labels[name], original[name]), (other, name)


# ----------------------------------------------------------------------------------------------- benchmark
def test_benchmark_predict_times_every_command_and_checks_parity(world, tmp_path):
    """Teacher and student (2-fold ensembles), stock command and ours, TTA off: one row each, ratios to the
    teacher's stock command, our command's time split, label and logit parity, per-patch latencies with and without
    the graph rewrite; the Markdown names the machine."""
    from nnunetv2_recokd.evaluation.predict_benchmark import run
    from nnunetv2_recokd.evaluation.tables import predict_benchmark_table as to_markdown

    _, results, student, images = world
    teacher = sandbox.write_random_teacher(tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres",
                                           sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json(),
                                           folds=(0, 1))
    result = run(teacher, student, images, tmp_path / "bench", ["openvino"], ["off"], ["0", "1"], None, 1, 1,
                 "folders", patch_plain_graph=True, precisions=("f32", "int8"), calibration=images)
    rows = {(r["model"], r["runtime"], r["precision"]): r for r in result["rows"]}
    assert sorted(rows) == [("student", "openvino", "f32"), ("student", "openvino", "int8"),
                            ("student", "torch", "f32"), ("teacher", "openvino", "f32"), ("teacher", "torch", "f32")]
    int8 = rows[("student", "openvino", "int8")]
    assert int8["command"] == "nnunetv2_recokd predict --runtime openvino --precision int8"
    parity = {(c["model"], c["precision"]): c for c in result["label_parity"]}
    assert 0.8 < parity[("student", "int8")]["voxel_agreement_vs_pytorch"] < 1.0  # quantized, close
    assert parity[("student", "f32")]["voxel_agreement_vs_pytorch"] > 0.999
    assert "student_openvino-int8" in result["first_load_with_onnx_export_s"]
    rows = {(m, r): row for (m, r, p), row in rows.items() if p == "f32"}
    assert rows[("teacher", "torch")]["ratio_to_teacher_stock"] == 1.0
    for row in rows.values():
        assert row["cases"] == 2 and row["wall_s"] > 0
        assert row["s_per_case"] == pytest.approx(row["wall_s"] / 2)
    breakdown = rows[("student", "openvino")]["breakdown"]
    assert breakdown["network_s"] > 0 and breakdown["setup_s"] >= breakdown["compile_s"] > 0
    assert {c["model"] for c in result["label_parity"]} == {"teacher", "student"}
    assert all(c["min_case_dice_vs_pytorch"] >= 0.999 for c in result["label_parity"] if c["precision"] == "f32")
    assert result["student_logit_parity"]["openvino"]["max_logit_difference_patch"] < 1e-3
    assert set(result["per_patch_ms"]["student"]) == {"torch", "openvino", "openvino plain", "openvino int8"}
    assert set(result["per_patch_ms"]["teacher"]) == {"torch", "openvino", "openvino plain"}
    assert all(r["folds"] == [0, 1] for r in result["rows"])
    markdown = to_markdown(result)
    assert "cores" in markdown and "| student | nnunetv2_recokd predict --runtime openvino | off | 0,1 |" in markdown
    assert "| student | nnunetv2_recokd predict --runtime openvino --precision int8 | off | 0,1 |" in markdown
    assert "| openvino | openvino plain | openvino int8 | x teacher eager (each) |" in markdown


def test_report_times_held_out_cases_on_the_runtime(world, tmp_path, monkeypatch):
    from nnunetv2_recokd.evaluation import report

    _, _, student, images = world
    checkpoint = student / "fold_0" / "checkpoint_final.pth"
    seconds, runtime = report.runtime_seconds_per_case(student, "0", checkpoint, images, tmp_path / "rt", False)
    assert runtime == "openvino" and seconds > 0
    assert sorted(p.name for p in (tmp_path / "rt").glob("*.nii.gz")) == ["case_000.nii.gz", "case_001.nii.gz"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # without the deploy extra: no column, no error
    assert report.runtime_seconds_per_case(student, "0", checkpoint, images, tmp_path / "none", False) == (None, None)
