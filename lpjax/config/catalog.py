"""The recipes and sweep suites that ship inside the package, found by name.

``setup.py`` installs the checkout's ``recipes/`` folder as the package ``lpjax.recipes`` (and
``recipes/sweeps/`` as ``lpjax.recipes.sweeps``), just as ``models/`` becomes ``lpjax.models``, so
``lpjax train --config mnist_resnet`` and ``lpjax bench --suite small`` work outside a checkout; an
editable install maps the same names onto the checkout's folders.

A recipe is a file there that defines ``get_config``. One whose ``get_config(arg)`` takes an argument
(big_vision's parametrised configs) declares two module-level literals, read here without running
the file: ``VARIANTS``, each argument with its one-line description, and optionally
``FORMER_NAMES``, the recipe names each argument had before (``{"cifar10_resnet32": "32"}``), which
keep working as names and as ``recipes/NAME.py`` paths. A recipe is named ``NAME`` or ``NAME:ARG``.
"""

import ast
import importlib.util
import os
import re

from lpjax.errors import ConfigError


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def recipes_dir() -> str | None:
    """The folder of the shipped recipes (the checkout's ``recipes/`` in an editable install), or None."""
    return _package_dir("lpjax.recipes")


def sweeps_dir() -> str | None:
    """The folder of the shipped sweep suites, or None."""
    return _package_dir("lpjax.recipes.sweeps")


def _files(folder) -> dict:
    """``{stem: parsed module}`` of the folder's config files: those that define ``get_config``."""
    if not folder or not os.path.isdir(folder):
        return {}
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and not name.startswith("_"):
            tree = _parse(os.path.join(folder, name))
            if tree is None or any(isinstance(node, ast.FunctionDef) and node.name == "get_config"
                                   for node in tree.body):
                found[name[:-3]] = tree  # a file that does not parse is listed, and says so
    return found


def _parse(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None


def _literal(tree, name: str) -> dict:
    """The value of the module-level ``name = {...}`` in ``tree``, or {} if it has none."""
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def recipe_names() -> list:
    """Every shipped recipe as ``lpjax train --config`` takes it: ``NAME``, or ``NAME:ARG`` for each
    variant of a parametrised recipe."""
    names = []
    for stem, tree in _files(recipes_dir()).items():
        variants = _literal(tree, "VARIANTS")
        names += [f"{stem}:{arg}" for arg in variants] if variants else [stem]
    return names


def former_names() -> dict:
    """``{former name: "NAME:ARG"}`` for the variants that were recipe files of their own."""
    return {old: f"{stem}:{arg}" for stem, tree in _files(recipes_dir()).items()
            for old, arg in _literal(tree, "FORMER_NAMES").items()}


def suite_names() -> list:
    """The shipped sweep suites, as ``lpjax bench --suite`` takes them."""
    return list(_files(sweeps_dir()))


def description(path: str, width: int = 96) -> str:
    """A recipe's one-line description: the first sentence of its module docstring (read, not run)."""
    tree = _parse(path)
    if tree is None:
        return "(no description: the file does not parse)"
    paragraph = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
    return _one_line(re.split(r"\.\s+(?=[A-Z])", paragraph)[0].rstrip("."), width)  # not at "et al. (2020)"


def _one_line(text: str, width: int) -> str:
    if len(text) > width:  # one line in a terminal: cut at a word
        text = text[:width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return text


def find_recipe(given: str) -> str:
    """The recipe file ``lpjax train --config`` loads for what the user gave.

    Args:
      given: a path that exists (``my_recipe.py``), a shipped recipe's name (``mnist_resnet``,
        ``cifar10_resnet:32``), a former name (``cifar10_resnet32``), or a ``recipes/NAME.py`` path
        naming either of those (a command copied from a recipe, run outside the checkout). ``:ARG``
        after a path or name is the argument for ``get_config``.

    Returns:
      ``PATH`` or ``PATH:ARG`` of the shipped file; ``given`` unchanged when it names no shipped recipe,
      so that the config loader reports the missing file in its own words.
    """
    if os.path.isfile(given):
        return given
    path, colon, arg = given.partition(":")
    if colon and os.path.isfile(path):
        return given
    stem = os.path.basename(path)[:-3] if path.endswith(".py") else path
    bare_name = os.sep not in path and not path.endswith(".py")
    in_recipes = os.path.dirname(os.path.normpath(path)) == "recipes"
    shipped = recipes_dir()
    if not shipped or not (bare_name or in_recipes):
        return given
    if stem in _files(shipped):
        return os.path.join(shipped, f"{stem}.py") + colon + arg
    now = former_names().get(stem)
    if now is not None and not colon:
        now_stem, now_arg = now.split(":", 1)
        return os.path.join(shipped, f"{now_stem}.py:{now_arg}")
    return given


def listing() -> str:
    """What ``lpjax recipes`` prints: every shipped recipe (each variant of a parametrised one) and
    sweep suite with its description. Raises ConfigError when the package ships none."""
    lines = ["recipes (lpjax train --config NAME):"]
    for stem, tree in _files(recipes_dir()).items():
        variants = _literal(tree, "VARIANTS")
        if variants:
            lines += [f"  {stem + ':' + str(arg):<20} {_one_line(str(what), 96)}" for arg, what in variants.items()]
        else:
            lines.append(f"  {stem:<20} {description(os.path.join(recipes_dir(), stem + '.py'))}")
    lines += ["", "sweep suites (lpjax bench --suite NAME):"]
    for name in suite_names():
        lines.append(f"  {name:<20} {description(os.path.join(sweeps_dir(), name + '.py'))}")
    if len(lines) == 3:
        raise ConfigError("no recipes found: the package lpjax.recipes is missing; reinstall lpjax")
    return "\n".join(lines)
