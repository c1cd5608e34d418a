"""Making the trainers visible to nnU-Net: install/--uninstall the shim, ext-path, a shim that never breaks nnU-Net."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

from nnunetv2_recokd import cli
from nnunetv2_recokd.cli import plugin


@pytest.fixture
def trainer_folder(tmp_path, monkeypatch) -> Path:
    """A stand-in for nnunetv2/training/nnUNetTrainer/ so the real installation is never touched."""
    folder = tmp_path / "nnUNetTrainer"
    folder.mkdir()
    monkeypatch.setattr(plugin, "nnunet_trainer_folder", lambda: folder)
    return folder


def shipped_shim() -> str:
    return (plugin.ext_folder() / plugin.SHIM_NAME).read_text()


def test_install_writes_the_shim_with_the_marker(trainer_folder, capsys):
    assert cli.main(["install"]) == 0
    shim = trainer_folder / plugin.SHIM_NAME
    assert shim.is_file()
    text = shim.read_text()
    assert text.startswith(plugin.SHIM_MARKER)
    assert text == plugin.SHIM_MARKER + shipped_shim()
    assert str(shim) in capsys.readouterr().out
    # installing again (e.g. after an upgrade) overwrites, still exactly one marker
    assert cli.main(["install"]) == 0
    assert shim.read_text().count(plugin.SHIM_MARKER) == 1


def test_uninstall_removes_the_shim(trainer_folder, capsys):
    assert cli.main(["install"]) == 0
    assert cli.main(["install", "--uninstall"]) == 0
    assert not (trainer_folder / plugin.SHIM_NAME).exists()
    assert "removed" in capsys.readouterr().out
    # nothing left to remove is not an error
    assert cli.main(["install", "--uninstall"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_uninstall_refuses_a_file_it_did_not_write(trainer_folder, capsys):
    foreign = trainer_folder / plugin.SHIM_NAME
    foreign.write_text("# someone's own trainer module\nclass X: pass\n")
    assert cli.main(["install", "--uninstall"]) == 1
    assert foreign.read_text() == "# someone's own trainer module\nclass X: pass\n"
    assert "refusing" in capsys.readouterr().err


def test_install_without_write_access_points_at_nnunet_extTrainer(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plugin, "nnunet_trainer_folder", lambda: tmp_path / "does" / "not" / "exist")
    assert cli.main(["install"]) == 1
    err = capsys.readouterr().err
    assert "nnUNet_extTrainer" in err and str(plugin.ext_folder()) in err


def test_installed_shim_is_found_by_nnunets_own_lookup(trainer_folder):
    from nnunetv2_recokd.trainers import PUBLIC_TRAINERS, nnUNetTrainerLogitKD

    assert cli.main(["install"]) == 0
    found = recursive_find_python_class(str(trainer_folder), "nnUNetTrainerLogitKD", None,
                                        cleanup_imports_from_base_folder=True)
    assert found is nnUNetTrainerLogitKD  # the same class, not a second copy
    for name in PUBLIC_TRAINERS:
        assert recursive_find_python_class(str(trainer_folder), name, None,
                                           cleanup_imports_from_base_folder=True) is not None


def _import_shim_in_subprocess(shim: Path, block: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import importlib.util, sys, warnings

        class Uninstalled:  # the import system's answer for a package that is not installed at all
            def find_spec(self, name, path=None, target=None):
                if name == {block!r} or name.startswith({block!r} + "."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Uninstalled())
        warnings.simplefilter("error")  # an uninstalled package must not even warn
        spec = importlib.util.spec_from_file_location("nnunetv2_recokd_trainers", {str(shim)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("TRAINERS", sorted(n for n in vars(module) if n.startswith("nnUNetTrainer")))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_shim_is_harmless_when_the_package_is_gone(trainer_folder):
    """After `pip uninstall nnunetv2-recokd` the leftover shim must not break nnU-Net's trainer lookup."""
    assert cli.main(["install"]) == 0
    result = _import_shim_in_subprocess(trainer_folder / plugin.SHIM_NAME, "nnunetv2_recokd")
    assert result.returncode == 0, result.stderr
    assert "TRAINERS []" in result.stdout


def test_shim_re_exports_the_trainers(trainer_folder):
    import importlib.util

    from nnunetv2_recokd.trainers import PUBLIC_TRAINERS, nnUNetTrainerStudent

    assert cli.main(["install"]) == 0
    spec = importlib.util.spec_from_file_location("_shim_under_test", trainer_folder / plugin.SHIM_NAME)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in PUBLIC_TRAINERS:
        assert hasattr(module, name)
    assert module.nnUNetTrainerStudent is nnUNetTrainerStudent


def test_ext_path_prints_a_folder_holding_only_the_shim(capsys):
    assert cli.main(["ext-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder.is_absolute() and folder.is_dir()
    assert folder == plugin.ext_folder()
    assert [p.name for p in folder.glob("*.py")] == [plugin.SHIM_NAME]
    # no packages either: nnU-Net would recurse into them and import everything it finds
    assert [p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"] == []


def test_ext_path_is_found_by_nnunets_external_lookup():
    from nnunetv2_recokd.trainers import nnUNetTrainerLogitKD

    found = recursive_find_python_class(str(plugin.ext_folder()), "nnUNetTrainerLogitKD", None,
                                        base_folder=str(plugin.ext_folder()), cleanup_imports_from_base_folder=True)
    assert found is nnUNetTrainerLogitKD


def test_ext_folder_is_not_the_package_folder():
    import nnunetv2_recokd

    assert plugin.ext_folder() != Path(nnunetv2_recokd.__file__).parent
    assert not (plugin.ext_folder() / "__init__.py").exists()


def test_shim_warns_when_part_of_the_package_is_broken(trainer_folder):
    """A missing submodule of ours is a packaging bug: say so instead of silently exporting no trainer."""
    assert cli.main(["install"]) == 0
    result = _import_shim_in_subprocess(trainer_folder / plugin.SHIM_NAME, "nnunetv2_recokd.losses")
    assert result.returncode != 0  # warnings are errors in the subprocess
    assert "nnunetv2-recokd trainers unavailable" in result.stderr and "nnunetv2_recokd.losses" in result.stderr
