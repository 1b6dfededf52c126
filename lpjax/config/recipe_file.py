"""Running a recipe file on its own, to say in one line why it does not give a config.

``ml_collections.config_flags`` loads recipes for the command line, but its failures lose their
reason ("Error whilst parsing config file:" for any TypeError or ValueError), a ``get_config()``
that returns None only logs a warning, and ``sys.exit()`` in a recipe ends the whole program. The
CLI calls ``load_recipe`` when loading failed, or to list a config's keys, and reports its message.
"""

import importlib.util
import inspect
import os
import traceback

import ml_collections

from lpjax.errors import ConfigError, first_line


def load_recipe(spec: str):
    """Runs a recipe file's ``get_config`` and says in one line why it gave no config.

    Args:
      spec: ``PATH`` or ``PATH:ARGUMENT`` (the argument goes to ``get_config``, as with config_flags).

    Returns:
      ``(config, None)``, or ``(None, reason)``: a one-line reason naming the file, the problem, the
      line where the recipe raised, and the fix (a ConfigError the recipe raises is its own reason).
      It never raises, and a ``sys.exit()`` in the recipe does not end the program.
    """
    path, *arguments = spec.split(":", 1)
    if not path:
        return None, "the --config path is empty; pass a recipe file such as recipes/mnist_mlp.py"
    if not os.path.exists(path):
        return None, f"could not load the config file {path}: no such file; pass a recipe file such as recipes/mnist_mlp.py"
    if not os.path.isfile(path):
        return None, f"could not load the config file {path}: it is not a file; pass a recipe file such as recipes/mnist_mlp.py"
    try:
        module = _run_file(path)
    except SystemExit as err:
        return None, f"the config file {path} called sys.exit({_exit_code(err)}){_where(err, path)} while loading; a recipe must only define get_config()"
    except Exception as err:
        return None, f"could not load the config file {path}: {type(err).__name__}: {first_line(err)}{_where(err, path)}"
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        return None, f"the config file {path} defines no get_config() function; a recipe's get_config() returns its ml_collections ConfigDict"
    try:
        inspect.signature(get_config).bind(*arguments)
    except TypeError:
        if arguments:
            return None, f"get_config() in {path} takes no argument; drop the ':{arguments[0]}' after the file name"
        return None, f"get_config() in {path} needs an argument; give it as --config={path}:ARGUMENT"
    except ValueError:  # a signature Python cannot inspect: let the call decide
        pass
    try:
        config = get_config(*arguments)
    except ConfigError as err:  # the recipe checked its argument, and its message names the fix
        return None, str(err)
    except SystemExit as err:
        return None, f"get_config() in {path} called sys.exit({_exit_code(err)}){_where(err, path)}; it must return the config instead"
    except Exception as err:
        return None, f"could not load the config file {path}: {type(err).__name__}: {first_line(err)}{_where(err, path)}"
    if not isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        got = "None (is a return statement missing?)" if config is None else f"a value of type {type(config).__name__}"
        return None, f"get_config() in {path} returned {got}; it must return an ml_collections ConfigDict, e.g. lpjax.config.build.base_config() with the recipe's keys set"
    return config, None


def _run_file(path):
    spec = importlib.util.spec_from_file_location("lpjax_recipe", os.path.abspath(path))
    if spec is None or spec.loader is None:  # a name Python cannot import from, e.g. no .py suffix
        from importlib.machinery import SourceFileLoader

        loader = SourceFileLoader("lpjax_recipe", os.path.abspath(path))
        spec = importlib.util.spec_from_loader("lpjax_recipe", loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_code(err) -> str:
    return "" if err.code is None else repr(err.code)


def _where(err, path) -> str:
    if isinstance(err, SyntaxError) and err.lineno:
        return ""  # its message already says "(file, line N)"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f" (line {frames[-1].lineno})" if frames else ""
