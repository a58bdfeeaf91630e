"""The layout's rules, read off the source: the library never needs Ray, jobs never import jobs
(statically, or by name through importlib: only the CLI's dispatch loads modules by name), and no
module-level import cycle exists anywhere in pipeline/ or ray_jobs/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "ray_jobs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    # A package's own __init__ resolves relative imports against itself.
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, *, top_level_only: bool) -> set[str]:
    """Modules `module` imports. With `top_level_only`, imports inside functions (deliberately
    lazy) and under `if TYPE_CHECKING:` are left out: only those can form an import-time cycle."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if top_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, child)
                # `from pkg import sub` imports the submodule `pkg.sub`; it needs nothing else
                # of `pkg`, so it is not an import of the package's __init__ (Python allows it
                # while that __init__ is still running).
                names = [f"{source}.{alias.name}" for alias in child.names]
                submodules = [name for name in names if name in MODULES]
                found.update(submodules)
                if len(submodules) < len(names):
                    found.add(source)
            visit(child)

    visit(tree)
    return found


def test_the_library_imports_neither_ray_nor_the_jobs() -> None:
    offenders = {
        module: sorted(i for i in _imports(module, top_level_only=False) if i.split(".")[0] in ("ray", "ray_jobs"))
        for module in MODULES
        if module.startswith("pipeline")
    }
    assert {m: i for m, i in offenders.items() if i} == {}


JOB_MODULES = sorted(m for m in MODULES if m.count(".") == 1 and m.startswith("ray_jobs.") and m != "ray_jobs.__init__")


@pytest.mark.parametrize("module", JOB_MODULES)
def test_a_job_imports_only_the_shared_helpers_of_ray_jobs(module: str) -> None:
    imported = _imports(module, top_level_only=False)
    others = sorted(i for i in imported if i.startswith("ray_jobs") and not i.startswith("ray_jobs._shared"))
    assert others == [], f"{module} imports {others}: what two jobs share belongs in pipeline/ or ray_jobs/_shared/"


def test_the_shared_helpers_import_no_job() -> None:
    offenders = {
        module: sorted(i for i in _imports(module, top_level_only=False) if i in JOB_MODULES)
        for module in MODULES
        if module.startswith("ray_jobs._shared")
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycles() -> None:
    graph = {m: {i for i in _imports(m, top_level_only=True) if i in MODULES and i != m} for m in MODULES}
    # A package's __init__ importing its own submodules is how re-exports work, not a cycle:
    # a submodule importing back through its package's __init__ is one.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_layout_rules_see_the_modules() -> None:
    # The rules above would pass vacuously if the walk found nothing.
    assert {"pipeline.manifest.commit", "pipeline.proxy.store", "pipeline.storage", "ray_jobs.query"} <= set(MODULES)
    assert "ray_jobs._shared.training" in _imports("ray_jobs.simulate", top_level_only=True)
    assert "pipeline.manifest.commit" in _imports("pipeline.manifest", top_level_only=True)
    assert _dynamic_imports(MODULES["ray_jobs.cli"].read_text())  # the CLI's dispatch is seen


# Modules that may load modules by name: the CLI's dispatch (a subcommand runs its job), the help
# it prints from a job's config class, and `python -m ray_jobs.JOB`'s entry, which imports the job's
# own module under its name (so Ray pickles it by reference). Everything else composes through
# typed calls.
DISPATCH = {"ray_jobs.cli", "ray_jobs._shared.config_cli", "ray_jobs._shared.entry"}
_LOADERS = {"importlib.import_module", "importlib.__import__", "__import__", "importlib.util.spec_from_file_location"}
_LOADERS |= {"runpy.run_module", "runpy.run_path"}


def _dynamic_imports(source: str) -> list[str]:
    """Calls in `source` that load a module by name (importlib.import_module, __import__, runpy,
    ...), however the loader was imported or aliased: each as `line: call`."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({alias.asname or alias.name.split(".")[0]: alias.name for alias in node.names})
            aliases.update({alias.asname: alias.name for alias in node.names if alias.asname})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        if isinstance(node, ast.Call) and dotted(node.func) in ("getattr", "builtins.getattr") and len(node.args) >= 2:
            base, name = dotted(node.args[0]), node.args[1]
            if base is not None and isinstance(name, ast.Constant) and isinstance(name.value, str):
                return f"{base}.{name.value}"
        return None

    return [
        f"{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and dotted(node.func) in _LOADERS
    ]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in DISPATCH))
def test_only_the_cli_dispatch_loads_modules_by_name(module: str) -> None:
    found = _dynamic_imports(MODULES[module].read_text())
    assert found == [], (
        f"{module} loads modules by name ({found}): compose jobs through the typed calls in ray_jobs/_shared/ "
        "(training.fit, querying.query, ...); only the CLI's dispatch (ray_jobs/cli.py) runs a job by name"
    )


@pytest.mark.parametrize(
    "source",
    [
        "import importlib\nimportlib.import_module('ray_jobs.train')",
        "import importlib as il\nil.import_module(name)",
        "from importlib import import_module as load\nload('ray_jobs.query')",
        "__import__('ray_jobs.train', fromlist=['JOB'])",
        "import importlib\ngetattr(importlib, 'import_module')('ray_jobs.train')",
        "import runpy\nrunpy.run_module('ray_jobs.train')",
        "def f():\n    from importlib import import_module\n    return import_module('ray_jobs.' + name)",
    ],
)
def test_a_dynamic_import_is_seen_however_it_is_written(source: str) -> None:
    assert len(_dynamic_imports(source)) == 1


def test_ordinary_calls_are_not_taken_for_dynamic_imports() -> None:
    assert _dynamic_imports("import json\njson.loads('{}')\nimport_module = 3\nprint(import_module)") == []


def test_private_modules_stay_inside_their_package() -> None:
    offenders = []
    for module in MODULES:
        for imported in _imports(module, top_level_only=False):
            parts = imported.split(".")
            private = next((i for i, part in enumerate(parts) if part.startswith("_") and part != "__init__"), None)
            if private is None or parts[0] not in PACKAGES:
                continue
            package = ".".join(parts[:private])  # where the private module lives
            if module != package and not module.startswith(package + "."):
                offenders.append(f"{module} imports {imported}")
    assert offenders == []
