"""The package's rooms and what each may import: `core/` is shared by both products and imports neither,
`tokenizer/` never imports `mllm/`, model code and metric functions are free of Lightning, no import cycles, and
the fixture generators (`devkit/`) are neither imported nor shipped by the package.

Imports are read with `ast` (every `import` / `from ... import` of a module, function-level ones included), so a
lazy import inside a function counts like a top-level one."""

import ast
import configparser
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages

from tests.cli_runs import REPO

PACKAGE = REPO / "seed_lightning"

# Plain nn.Modules and pure functions: Lightning wraps them, they never import it.
LIGHTNING_FREE = [
    "seed_lightning.tokenizer.vision",
    "seed_lightning.tokenizer.causal_qformer",
    "seed_lightning.tokenizer.quantizer",
    "seed_lightning.tokenizer.heads",
    "seed_lightning.tokenizer.sd_text_encoder",
    "seed_lightning.tokenizer.image_decoder",
    "seed_lightning.tokenizer.patch_decoder",
    "seed_lightning.tokenizer.model",
    "seed_lightning.tokenizer.losses",
    "seed_lightning.tokenizer.retrieval",
    "seed_lightning.mllm.model",
    "seed_lightning.mllm.visual_vocab",
    "seed_lightning.mllm.packing",
    "seed_lightning.mllm.prompts",
    "seed_lightning.mllm.rows",
    "seed_lightning.mllm.captions",
    "seed_lightning.mllm.vqa",
    "seed_lightning.core.clip_score",
    "seed_lightning.core.modes",
    "seed_lightning.core.fp8",
    "seed_lightning.core.pretrained",
]
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute dotted names (`from a import b` gives `a.b`
    and `a`: `b` may be a module or a name in `a`)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = package_modules()
    return {
        name: {imported for imported in imported_names(path, name) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def all_imports() -> dict[str, set[str]]:
    return {name: imported_names(path, name) for name, path in package_modules().items()}


def in_room(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_import_graph_reads_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "seed_lightning" / "room" / "thing.py"
    source.parent.mkdir(parents=True)
    source.write_text("import os\n\ndef f():\n    from lightning.pytorch import Trainer\n    from . import sibling\n")
    names = imported_names(source, "seed_lightning.room.thing")
    assert {"os", "lightning.pytorch", "lightning.pytorch.Trainer", "seed_lightning.room.sibling"} <= names


def test_the_rooms_exist_and_old_rooms_are_gone():
    modules = package_modules()
    for room in ("seed_lightning.core", "seed_lightning.core.data", "seed_lightning.tokenizer", "seed_lightning.mllm"):
        assert room in modules, f"{room} is not a package"
    for old in ("models", "data", "training", "metrics", "callbacks"):
        assert not (PACKAGE / old).exists(), f"seed_lightning/{old}/ should be gone (moved into core/tokenizer/mllm)"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported):] + [imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_core_imports_neither_product():
    offenders = [
        f"{name} imports {imported}"
        for name, imports in import_graph().items()
        if in_room(name, "seed_lightning.core")
        for imported in imports
        if in_room(imported, "seed_lightning.tokenizer") or in_room(imported, "seed_lightning.mllm")
    ]
    assert not offenders, offenders


def test_tokenizer_never_imports_mllm():
    offenders = [
        f"{name} imports {imported}"
        for name, imports in import_graph().items()
        if in_room(name, "seed_lightning.tokenizer")
        for imported in imports
        if in_room(imported, "seed_lightning.mllm")
    ]
    assert not offenders, offenders


def test_model_code_and_metric_functions_never_import_lightning():
    imports = all_imports()
    missing = [name for name in LIGHTNING_FREE if name not in imports]
    assert not missing, f"listed as Lightning-free but not in the package: {missing}"
    offenders = [
        f"{name} imports {imported}"
        for name in LIGHTNING_FREE
        for imported in imports[name]
        if any(in_room(imported, root) for root in LIGHTNING)
    ]
    assert not offenders, offenders


def test_the_package_never_imports_devkit():
    offenders = [
        f"{name} imports {imported}"
        for name, imports in all_imports().items()
        for imported in imports
        if in_room(imported, "devkit")
    ]
    assert not offenders, offenders


def test_importing_the_package_loads_no_fixture_generator():
    code = "import sys, seed_lightning; print(sorted(m for m in sys.modules if m == 'devkit' or m.startswith('devkit.')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_the_installed_packages_are_the_package_and_its_rooms_without_devkit():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    include = [pattern.strip() for pattern in setup["options.packages.find"]["include"].split()]
    packages = set(find_packages(where=str(REPO), include=include))
    assert not [package for package in packages if in_room(package, "devkit")], packages
    expected = {name for name, path in package_modules().items() if path.name == "__init__.py"}
    assert packages == expected, f"shipped {sorted(packages)}, package folders {sorted(expected)}"


def test_no_library_default_points_at_the_tiny_fixture_models():
    """The tiny models are fixtures: conf/*/tiny*.yaml, the Makefile, devkit/ and the tests name them; the package's
    defaults are the paper's hub ids or required arguments."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "data/models" in line
    ]
    assert not offenders, offenders
