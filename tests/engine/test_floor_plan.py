"""The engine's floor plan: a folder per role, and every import pointing down the floors.

A module may import its own folder and any folder on a lower floor, never one above it: the
core loop never reaches into the executor, a layer never into the model runner. The shared
data types (config, sampling params, outputs, the step's attention metadata) are the ground
floor and import nothing of the engine, so every room can import them. Imports inside
functions count (a lazy import is still an arrow); `if TYPE_CHECKING:` blocks do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"

# top to bottom; a module belongs to the first floor that names it or a package above it
FLOORS: list[tuple[str, ...]] = [
    ("engine", "engine.llm_engine", "engine.async_engine", "engine.engine_thread"),  # the door
    ("engine.evaluation", "engine.compress"),  # tools over a runner or a checkpoint folder
    ("engine.executor",),
    ("engine.loader",),
    ("engine.lora",),
    ("engine.core",),
    ("engine.models",),
    ("engine.layers",),
    ("engine.quant",),
    ("engine.kernels",),
    ("engine.distributed",),
    ("engine.demo",),
    ("engine.config", "engine.sampling_params", "engine.outputs", "engine.forward_context"),
]

ROLE_FOLDERS = (
    "core",
    "executor",
    "loader",
    "lora",
    "models",
    "layers",
    "quant",
    "kernels",
    "distributed",
    "demo",
)
PUBLIC_TOP_LEVEL = {
    "__init__.py",
    "llm_engine.py",
    "async_engine.py",
    "engine_thread.py",
    "config.py",
    "sampling_params.py",
    "outputs.py",
    "forward_context.py",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The engine modules `name` imports (a `from pkg import mod` names the module)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in found if target.split(".")[0] == "engine" and target != name}


def _floor(module: str) -> int:
    """The floor of the longest prefix that names `module` ("engine" names only the package)."""
    matches = [
        (len(prefix), level)
        for level, floor in enumerate(FLOORS)
        for prefix in floor
        if module == prefix or (prefix != "engine" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is on no floor: add it to FLOORS"
    return max(matches)[1]


def _arrows() -> list[tuple[str, str]]:
    known = _modules()
    return [(name, target) for name, path in known.items() for target in sorted(_imports(name, path, known))]


def test_every_engine_module_is_on_a_floor():
    for name in _modules():
        _floor(name)


def test_no_import_runs_back_up_the_floors():
    upward = [
        f"{source} (floor {_floor(source)}) imports {target} (floor {_floor(target)})"
        for source, target in _arrows()
        if _floor(target) < _floor(source)
    ]
    assert upward == []


def test_the_shared_types_import_nothing_of_the_engine():
    ground = len(FLOORS) - 1
    assert [(source, target) for source, target in _arrows() if _floor(source) == ground] == []


def test_the_top_level_holds_the_entry_points_and_role_folders():
    files = {p.name for p in ENGINE.iterdir() if p.is_file() and p.suffix == ".py"}
    folders = {p.name for p in ENGINE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert files == PUBLIC_TOP_LEVEL
    assert set(ROLE_FOLDERS) <= folders


@pytest.mark.parametrize("folder", sorted(p.name for p in ENGINE.iterdir() if (p / "__init__.py").exists()))
def test_each_folder_says_its_role_in_its_docstring(folder):
    docstring = ast.get_docstring(ast.parse((ENGINE / folder / "__init__.py").read_text()))
    assert docstring, f"engine/{folder}/__init__.py has no docstring"
    summary = docstring.splitlines()[0]
    assert summary.endswith("."), f"engine/{folder}: the role in one line, a sentence: {summary!r}"


def test_the_core_loop_imports_no_torch_modules():
    """The scheduler, block manager and stages are pure Python: testable without a device."""
    core = [name for name in _modules() if name.startswith("engine.core.")]
    for name in core:
        tree = ast.parse(_modules()[name].read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "torch.nn" or m.startswith("torch.nn.") for m in imported), name
