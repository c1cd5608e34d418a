"""The package's layout (docs/how_it_works.md, below the code tree): thin commands, measuring code once, no
import circle.

1. Each command module (nnunetv2_recokd/cli/<name>.py, every one but the dispatcher __init__.py, __main__.py and
   common.py) imported alone in a fresh interpreter pulls no other command module. Allowed beside it: the package
   nnunetv2_recokd.cli itself (its __init__.py is the dispatcher: it imports a command module only inside
   build_parser / main, never at import) and cli/common.py (the model arguments several commands share; not a
   command).
2. No command module carries measuring or reporting code (the rule in command_module_violations).
3. The import graph of nnunetv2_recokd/ has no circle (the rule in import_graph).
And the registry config.py walks instead of importing the trainers (trainer_names.PARENTS) is the real class
hierarchy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import nnunetv2_recokd
from nnunetv2_recokd import cli, evaluation

PACKAGE = Path(nnunetv2_recokd.__file__).resolve().parent
CLI = PACKAGE / "cli"
NOT_COMMANDS = {"__init__", "__main__", "common"}
COMMANDS = sorted(p.stem for p in CLI.glob("*.py") if p.stem not in NOT_COMMANDS)


def test_every_command_module_is_dispatched():
    assert set(COMMANDS) == set(cli.MODULES)
    assert {module for module, _ in cli.COMMANDS.values()} == set(cli.MODULES)


# ------------------------------------------------------------------------ 1. a command imports no other command
@pytest.mark.parametrize("name", COMMANDS)
def test_importing_a_command_module_pulls_no_other_command_module(name):
    code = (f"import sys, nnunetv2_recokd.cli.{name}\n"
            "print(sorted(m for m in sys.modules if m.startswith('nnunetv2_recokd.cli')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = set(eval(done.stdout.strip().splitlines()[-1]))
    allowed = {"nnunetv2_recokd.cli", "nnunetv2_recokd.cli.common", f"nnunetv2_recokd.cli.{name}"}
    assert loaded <= allowed, f"importing cli/{name}.py also imports {sorted(loaded - allowed)}"


# --------------------------------------------------------------------- 2. no measuring code in a command module
# what a command module may not import: the clock (time; evaluation/timing.py has it), averages (statistics),
# figures (matplotlib; evaluation/figures.py), nnU-Net's scoring and predictor (evaluation/summary.py and
# networks.py wrap them)
MEASURING_IMPORTS = ("time", "statistics", "matplotlib", "nnunetv2.evaluation", "nnunetv2.inference")
# what a command module may not write: nnU-Net's summary file (read in evaluation/summary.py) and Markdown tables
# (evaluation/tables.py)
MEASURING_TEXT = ("summary.json", "|---")


def command_module_violations(source: str) -> list[str]:
    """What in a command module's source belongs to the library (nnunetv2_recokd.evaluation):

    - a function or class (at any depth) named as one that nnunetv2_recokd.evaluation exports (__all__): the merged
      helper written again;
    - an import of a module in MEASURING_IMPORTS or below it (the clock, statistics, matplotlib, nnU-Net's
      evaluation and inference): the only ways to time, average, draw or score;
    - a string constant holding "summary.json" or "|---": reading nnU-Net's summary, writing a Markdown table.

    Returns one line per finding ("<line>: <what>"); empty for a thin command module.
    """
    found = []
    exported = set(evaluation.__all__)

    def measuring(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in MEASURING_IMPORTS)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in exported:
            found.append(f"{node.lineno}: defines {node.name}, which nnunetv2_recokd.evaluation exports")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: imports {a.name}" for a in node.names if measuring(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and measuring(node.module):
            found.append(f"{node.lineno}: imports from {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{node.lineno}: writes {text!r}" for text in MEASURING_TEXT if text in node.value]
    return found


@pytest.mark.parametrize("name", COMMANDS)
def test_command_modules_hold_no_measuring_code(name):
    assert command_module_violations((CLI / f"{name}.py").read_text()) == []


def test_the_rule_finds_measuring_code():
    """What the command modules held before evaluation/ existed, each kind found."""
    source = '''
import json
import statistics
import time
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder


def read_summary(path, names):
    return json.loads((path / "summary.json").read_text())


def to_markdown(rows):
    start = time.perf_counter()
    return "\\n".join(["| a | b |", "|---|---|"]), time.perf_counter() - start
'''
    found = command_module_violations(source)
    assert sorted(line.split(": ", 1)[1] for line in found) == sorted([
        "imports statistics", "imports time", "imports from nnunetv2.evaluation.evaluate_predictions",
        "defines read_summary, which nnunetv2_recokd.evaluation exports", "writes 'summary.json'", "writes '|---'"])


def test_the_library_exports_what_it_names():
    for name in evaluation.__all__:
        assert getattr(evaluation, name) is not None


# -------------------------------------------------------------------------------------- 3. no import circle
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, from every import statement of its source: at module level and
    inside functions alike (a lazy import still makes one module depend on another, and both circles the package
    had went through lazy imports), `if TYPE_CHECKING:` ones too. `from a.b import c` is an edge to a.b.c when that
    is a module, else to a.b. The parent packages that importing a.b.c runs (a/__init__.py, a/b/__init__.py) are not
    edges: a package's __init__ that imports its own submodules (trainers/__init__.py) would otherwise be a circle
    with each of them. The two dispatchers that import by name (importlib) get their edges from what they name:
    cli/__init__.py -> every command module in MODULES, evaluation/__init__.py -> every module of _PUBLIC."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = edges - {name}
    graph["nnunetv2_recokd.cli"] |= {f"nnunetv2_recokd.cli.{m}" for m in cli.MODULES}
    graph["nnunetv2_recokd.evaluation"] |= {f"nnunetv2_recokd.evaluation.{m}" for m in evaluation._PUBLIC}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of the graph (a list of modules, the first repeated at the end), or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle:
                    return circle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return []


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "nnunetv2_recokd.evaluation.summary" in graph
    assert "nnunetv2_recokd.trainers" not in graph["nnunetv2_recokd.config"]
    assert find_circle(graph) == [], " -> ".join(find_circle(graph))


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


# ------------------------------------------------------------------- the registry config.py walks (no trainers)
def test_parents_registry_is_the_class_hierarchy():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunetv2_recokd.trainers as trainers
    from nnunetv2_recokd.config import _lineage
    from nnunetv2_recokd.trainer_names import BASE_TRAINER, PARENTS, PUBLIC_TRAINERS, lineage

    assert set(PARENTS) == {BASE_TRAINER, *PUBLIC_TRAINERS}
    for name, parent in PARENTS.items():
        cls = getattr(trainers, name)
        assert [base.__name__ for base in cls.__bases__] == [parent], name
        mro = [k.__name__ for k in reversed(cls.__mro__)]
        walked = lineage(name)
        assert mro[mro.index(nnUNetTrainer.__name__):] == walked
        # config's lineage of the name (the registry) and of the class (its MRO) give the same shipped settings
        assert [n for n in _lineage(name) if n in PARENTS] == [n for n in _lineage(cls) if n in PARENTS]


def test_unknown_trainer_names_are_refused_without_importing_the_trainers():
    from nnunetv2_recokd.config import SettingsError, default_settings

    with pytest.raises(SettingsError, match="is not one of our trainers"):
        default_settings("nnUNetTrainerNope")
    code = ("import sys\nfrom nnunetv2_recokd.config import default_settings\n"
            "default_settings('nnUNetTrainerReCoKD_w2')\n"
            "print(any(m.startswith('nnunetv2_recokd.trainers') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("trainer", ["nnUNetTrainerReCoKD", "nnUNetTrainerStudent_w2", "nnUNetTrainerReCoKD_w8"])
def test_predictor_builds_a_student_without_record_as_its_trainer_does(trainer):
    """deploy/predictor.py's stand-in for a trainer class (no trainers imported) builds, for plans without the
    student record, the network the trainer class's own build_network_architecture builds."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunetv2_recokd.trainers as trainers
    from nnunetv2_recokd import sandbox
    from nnunetv2_recokd.deploy.predictor import _PlansNetwork

    manager = PlansManager(sandbox.unet_plans((32, 64, 128), (16, 16, 16)))
    configuration = manager.get_configuration("3d_fullres")
    ours = _PlansNetwork(trainer).build_network_architecture(manager, configuration, 1, 3, False)
    theirs = getattr(trainers, trainer).build_network_architecture(manager, configuration, 1, 3, False)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
