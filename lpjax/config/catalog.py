"""The recipes and sweep suites that ship inside the package, found by name.

``setup.py`` installs the checkout's ``recipes/`` folder as the package ``lpjax.recipes`` (and
``recipes/sweeps/`` as ``lpjax.recipes.sweeps``), just as ``models/`` becomes ``lpjax.models``, so
``lpjax train --config mnist_resnet`` and ``lpjax bench --suite small`` work outside a checkout; an
editable install maps the same names onto the checkout's folders.
"""

import ast
import importlib.util
import os

from lpjax.errors import ConfigError


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def recipes_dir() -> str | None:
    return _package_dir("lpjax.recipes")


def sweeps_dir() -> str | None:
    return _package_dir("lpjax.recipes.sweeps")


def _names(folder) -> list:
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py") and not name.startswith("_"))


def recipe_names() -> list:
    return _names(recipes_dir())


def suite_names() -> list:
    return _names(sweeps_dir())


def description(path: str, width: int = 96) -> str:
    """A recipe's one-line description: the first sentence of its module docstring (read, not run)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
        return "(no description: the file does not parse)"
    paragraph = " ".join(doc.split("\n\n")[0].split())
    first = paragraph.split(". ")[0].rstrip(".")
    if len(first) > width:  # one line in a terminal: cut at a word
        first = first[:width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return first


def find_recipe(given: str) -> str:
    """The file of a recipe given by name (``mnist_resnet``), by a path that exists, or by a path
    such as ``recipes/mnist_resnet.py`` that names a shipped recipe (run outside the checkout)."""
    if os.path.isfile(given):
        return given
    stem = os.path.basename(given)[:-3] if given.endswith(".py") else given
    shipped = recipes_dir()
    bare_name = os.sep not in given and not given.endswith(".py")
    in_recipes = os.path.dirname(os.path.normpath(given)) == "recipes"
    if shipped and stem in recipe_names() and (bare_name or in_recipes):
        return os.path.join(shipped, f"{stem}.py")
    return given  # the config loader reports the missing file with its own words


def listing() -> str:
    """What ``lpjax recipes`` prints: every shipped recipe and sweep suite with its description."""
    lines = ["recipes (lpjax train --config NAME):"]
    for name in recipe_names():
        lines.append(f"  {name:<20} {description(os.path.join(recipes_dir(), name + '.py'))}")
    lines += ["", "sweep suites (lpjax bench --suite NAME):"]
    for name in suite_names():
        lines.append(f"  {name:<20} {description(os.path.join(sweeps_dir(), name + '.py'))}")
    if len(lines) == 3:
        raise ConfigError("no recipes found: the package lpjax.recipes is missing; reinstall lpjax")
    return "\n".join(lines)
