"""The package's layers, read from every module's imports (AST): the direction README's "Layout of the
code" promises, and no module reaching into another's private names."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("core", "executors", "training", "config", "distributed", "research", "data")
# What each layer may import from lpjax (besides itself, lpjax.errors and third-party code).
ALLOWED = {
    "core": set(),
    "executors": {"core"},
    "data": set(),
}
# models/ install as lpjax.models: they know nothing of methods, schedules, executors or the run machinery.
MODELS_FORBIDDEN = ("lpjax.core.methods", "lpjax.core.schedules", "lpjax.core.stage_rule", "lpjax.executors",
                    "lpjax.training", "lpjax.config", "lpjax.distributed", "lpjax.research")


def _modules():
    for path in sorted((REPO / "lpjax").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path
    for path in sorted((REPO / "models").glob("*.py")):
        yield "lpjax.models." + path.stem if path.stem != "__init__" else "lpjax.models", path


def _imports(path):
    """``(line, module, names)`` for every import in the file, at any depth (lazy imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            yield node.lineno, module, [alias.name for alias in node.names]


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lpjax" and parts[1] in LAYERS else None


MODULES = list(_modules())


def test_the_layout_has_the_layers_the_readme_names():
    for layer in LAYERS:
        assert (REPO / "lpjax" / layer / "__init__.py").exists(), layer
    flat = sorted(p.name for p in (REPO / "lpjax").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "cli.py", "errors.py"]


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_a_module_imports_only_from_the_layers_below_it(module, path):
    layer = _layer(module)
    bad = []
    for line, imported, names in _imports(path):
        targets = [imported] + [f"{imported}.{n}" for n in names]
        if module.startswith("lpjax.models"):
            bad += [f"{path.name}:{line} imports {t}" for t in targets if t.startswith(MODELS_FORBIDDEN)]
        elif layer in ALLOWED:
            for target in targets:
                other = _layer(target)
                if other is not None and other != layer and other not in ALLOWED[layer]:
                    bad.append(f"{path.name}:{line} imports {target} ({layer} may use {sorted(ALLOWED[layer]) or 'nothing'})")
                if target.startswith("lpjax.models") and layer in ("core", "executors"):
                    bad.append(f"{path.name}:{line} imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_module_imports_another_modules_private_names(module, path):
    bad = []
    tree = ast.parse(path.read_text())
    imported_modules = {}
    for line, imported, names in _imports(path):
        if not imported.startswith("lpjax") or imported == module:
            continue
        bad += [f"{path.name}:{line} imports {imported}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    for node in ast.walk(tree):  # import lpjax.x.y as m; m._private
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lpjax"):
            for alias in node.names:
                imported_modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported_modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{path.name}:{node.lineno} reads {imported_modules[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_module_of_the_package_is_over_450_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for _, p in MODULES if (n := len(p.read_text().splitlines())) > 450]
    assert not long, long
