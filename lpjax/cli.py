"""The ``lpjax`` command line.

    lpjax train --config NAME|FILE [--config.KEY=VALUE ...] --workdir DIR   train, or resume DIR
    lpjax train --config NAME|FILE --print-config                           the resolved config, as JSON
    lpjax train --config NAME|FILE --workdir DIR --dry-run                  build and check, train nothing
    lpjax train --config NAME|FILE --topology v5e:4x4 --compile-only        will it fit? compile for a TPU pod
    lpjax bench --suite NAME|FILE --workdir DIR                             compute-efficiency sweep
    lpjax plot --workdir DIR                                                learning curves, PNG + SVG
    lpjax recipes                                                           the shipped recipes and suites
    lpjax launch -n N [--cpu-devices D] -- train ...                      N local processes, one run
    lpjax COMMAND --help                                                    a command's flags (and config keys)

A recipe NAME is one of the files that ship in the package (``lpjax recipes`` lists them); a FILE is
any recipe path.

A user's mistake (a bad config value, an unknown key, a config file that is missing or raises, a bad
flag) ends with one line on stderr, ``lpjax: error: ...``, and exit code 2, before anything is written
to the workdir. A run halted by a non-finite loss or gradient, by a lost peer process, or by a write
that failed (a full disk) ends with one line and exit code 1, as does a ``--compile-only`` whose
programs do not fit the target's HBM (the line names the program and the shortfall). Anything else is a bug in lpjax and keeps its traceback.
"""

import contextlib
import difflib
import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from lpjax.config import catalog
from lpjax.config.checks import did_you_mean
from lpjax.errors import ConfigError, NonFiniteError, WriteError, first_line
from lpjax.training.preemption import Preempted
from lpjax.config.recipe_file import load_recipe
from lpjax.training.loop import train_and_evaluate

PROG = "lpjax"
USAGES = {
    "train": f"{PROG} train --config NAME|FILE [--config.KEY=VALUE ...] --workdir DIR [--print-config] [--dry-run] "
             f"[--topology NAME --compile-only [--num-slices N]]",
    "bench": f"{PROG} bench --suite NAME|FILE --workdir DIR",
    "plot": f"{PROG} plot --workdir DIR",
    "recipes": f"{PROG} recipes",
}
SUMMARIES = {
    "train": "train a recipe; a --workdir that holds checkpoints is resumed",
    "bench": "run a compute-efficiency sweep and write report.md with its figures",
    "plot": "draw a training run's learning curves (PNG and SVG)",
    "recipes": "list the recipes and sweep suites that ship with lpjax",
}
FLAGS = {  # per command: (flag, what it does)
    "train": [("--config NAME|FILE", "a shipped recipe by name (lpjax recipes) or a recipe file with get_config()"),
              ("--config.KEY=VALUE", "override one config key (below), e.g. --config.method.name=chunked"),
              ("--workdir DIR", "the run's directory; one that holds checkpoints is resumed"),
              ("--print-config", "print the resolved config as JSON (data and model built to fill it) and stop"),
              ("--dry-run", "build and check data, model, trainer and workdir; print the header; train nothing"),
              ("--topology NAME", "with --compile-only: the target, e.g. v5e:4x4, v5p:4x4x4, 2xv4:4x4x4, or cpu"),
              ("--compile-only", "compile every training program for --topology (no TPU needed: pip install "
                                 "'lpjax[tpu]'); print memory per device against HBM, compile times and "
                                 "collectives; exit 1 if a program does not fit; --workdir optional"),
              ("--num-slices N", "with --compile-only: slices of the topology (or an Nx prefix: 2xv4:4x4x4)")],
    "bench": [("--suite NAME|FILE", "a shipped sweep suite by name (lpjax recipes) or a sweep recipe file"),
              ("--workdir DIR", "the sweep's directory; finished runs in it are skipped")],
    "plot": [("--workdir DIR", "a training run's directory (reads metrics.jsonl, writes curves.png/.svg)")],
    "recipes": [],
}
USAGE = "usage: " + " | ".join(USAGES.values())
COMMANDS = tuple(USAGES)
COMPILE_ONLY_FLAGS = ("topology", "num-slices", "compile-only")
EXIT_USAGE = 2
EXIT_HALTED = 1


class UsageError(Exception):
    """A mistake on the command line; reported as one line."""


def main(argv=None) -> int:
    code = _run(argv)
    if argv is None:  # the command line itself, not a call from Python: see watchdog.leave_process
        from lpjax.distributed.watchdog import leave_process

        leave_process(code)
    return code


def _run(argv) -> int:
    from lpjax.training import process_hooks

    process_hooks.install()  # the command line's own: orbax's late tracebacks after a reported failure
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["launch"]:  # its own options; everything after '--' belongs to the children
        from lpjax.distributed.launch import main as launch

        return launch(argv[2:])
    try:
        if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
            command = next((arg for arg in argv[1:] if arg in COMMANDS), None)
            print(command_help(command) if command else _help_text())
            return 0
        command, options = parse(_with_recipe_paths(argv))
        if options.get("workdir"):
            from lpjax.training.workdir import check_local

            check_local(options["workdir"])  # gs://... : one line naming the fix, for every command
        if command == "train":
            if options["compile_only"]:
                return _compile_only(options)
            if options["print_config"]:
                from lpjax.config.build import build_experiment

                print(json.dumps(build_experiment(options["config"]).config, indent=2, default=str))
            else:
                train_and_evaluate(options["config"], options["workdir"], dry_run=options["dry_run"])
        elif command == "bench":
            from lpjax.research.bench import run_bench  # matplotlib and the sweep code load only when asked for

            run_bench(options["suite"], options["workdir"])
        elif command == "recipes":
            print(catalog.listing())
        else:
            from lpjax.research.plots import plot_run

            for written in plot_run(options["workdir"]):
                print(written)
        return 0
    except (UsageError, ConfigError) as err:
        from lpjax.distributed.multihost import SharedConfigError

        return _fail(str(err), leave_at_once=not isinstance(err, SharedConfigError))
    except (NonFiniteError, WriteError) as err:
        return _fail(str(err), EXIT_HALTED)
    except Preempted as stop:
        from lpjax.distributed.multihost import is_writer

        if is_writer():
            print(str(stop), flush=True)
        return stop.exit_code
    except ModuleNotFoundError as err:
        extra = {"matplotlib": "plot", "tensorflow_datasets": "data", "PIL": "data"}.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        return _fail(f"this needs {err.name}, which a plain install leaves out; pip install 'lpjax[{extra}]'")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _with_recipe_paths(argv) -> list:
    """``--config NAME`` (a shipped recipe) as the path of its file, which config_flags can load."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + catalog.find_recipe(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = catalog.find_recipe(out[i + 1])
    return out


def parse(argv):
    """``(command, options)`` from the command line, or a UsageError naming what is wrong; options
    holds ``config`` (train), ``suite`` (bench) and ``workdir``."""
    flag_values = _define_flags(argv)
    try:
        with _quiet_config_flags():
            rest = flag_values(argv)
    except flags.UnrecognizedFlagError as err:
        raise UsageError(_explain_bad_flag(err.flagname, argv)) from None
    except SystemExit as err:  # the recipe called sys.exit(); never let it end lpjax silently
        raise UsageError(_explain_parse_failure(err, argv)) from None
    except flags.Error as err:
        message = first_line(err)
        if "Error whilst parsing config file" in message:  # config_flags keeps the reason in a traceback
            message = _load_config_only(argv)[1] or message
        elif "is not supported for overriding" in message:  # the recipe set the key to a bare None
            message = (f"{message.split('. Currently')[0]}; declare it in the recipe with "
                       f"ml_collections.config_dict.placeholder(TYPE)")
        raise UsageError(message) from None
    except Exception as err:  # raised while running the recipe file or applying an override to it
        raise UsageError(_explain_parse_failure(err, argv)) from None
    positional = rest[1:]
    if not positional:
        raise UsageError(f"no command given; {USAGE}")
    if positional[0] not in COMMANDS or len(positional) > 1:
        raise UsageError(f"unknown command {' '.join(positional)!r}{did_you_mean(positional[0], COMMANDS)}; {USAGE}")
    command = positional[0]
    usage = f"usage: {USAGES[command]}"
    given = [name for name in ("config", "suite", "workdir", "print-config", "dry-run", *COMPILE_ONLY_FLAGS)
             if flag_values[name].present]
    wanted = {"train": ["config", "workdir", "print-config", "dry-run", *COMPILE_ONLY_FLAGS], "bench": ["suite", "workdir"],
              "plot": ["workdir"], "recipes": []}[command]
    for name in given:
        if name not in wanted:
            raise UsageError(f"{command} takes no --{name}; {usage}")
    if command == "recipes":
        return command, {}
    if command == "train" and flag_values["config"].value is None:
        if flag_values["config"].present:  # the recipe's get_config() returned None
            raise UsageError(_load_config_only(argv)[1] or f"missing --config; {usage}")
        raise UsageError(f"missing --config; {usage}")
    print_config = command == "train" and flag_values["print-config"].value
    compile_only = command == "train" and flag_values["compile-only"].value
    if command == "train":
        _check_compile_only_flags(flag_values, usage)
    if not flag_values.workdir and not print_config and not compile_only:
        raise UsageError(f"missing --workdir; {usage}")
    if command == "bench":
        if not flag_values.suite:
            raise UsageError(f"missing --suite; {usage}")
        return command, {"suite": flag_values.suite, "workdir": flag_values.workdir}
    if command == "plot":
        return command, {"workdir": flag_values.workdir}
    if _config_failed(flag_values):
        _, error = _load_config_only(argv)
        raise UsageError(error or "the config file did not load with the given --config overrides")
    return command, {"config": flag_values.config, "workdir": flag_values.workdir, "print_config": print_config,
                     "dry_run": flag_values["dry-run"].value, "compile_only": compile_only,
                     "topology": flag_values.topology, "num_slices": flag_values["num-slices"].value}


def _check_compile_only_flags(flag_values, usage: str) -> None:
    if flag_values["compile-only"].value:
        if not flag_values.topology:
            raise UsageError(f"--compile-only needs --topology, e.g. --topology v5e:4x4 (or cpu); {usage}")
        if flag_values["print-config"].value or flag_values["dry-run"].value:
            raise UsageError("--compile-only takes no --print-config or --dry-run; give one of them")
    else:
        for name in ("topology", "num-slices"):
            if flag_values[name].present:
                raise UsageError(f"--{name} is for --compile-only; add --compile-only to compile for it")


def _compile_only(options) -> int:
    """Compile the recipe's programs for ``--topology``; 0 when all fit, else 1 with the shortfall line."""
    from lpjax.training.compile_only import compile_only

    report = compile_only(options["config"], options["topology"], options["workdir"],
                          num_slices=options["num_slices"], progress=lambda line: print(line, flush=True))
    print(report.text(), flush=True)
    line = report.shortfall_line()
    if line is not None:
        print(f"{PROG}: {line}", file=sys.stderr)
        return EXIT_HALTED
    return 0


def _config_failed(flag_values) -> bool:
    try:
        flag_values.config.keys()  # a file that failed to load only says so when first used
        return False
    except Exception:
        return True


def _define_flags(argv) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    # sys_argv: config_flags otherwise finds the --config.KEY overrides in sys.argv, not in our argv
    config_flags.DEFINE_config_file("config", None, "Recipe file with get_config(); override keys with "
                                    "--config.KEY=VALUE.", flag_values=flag_values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "The run's directory (train, plot) or the sweep's (bench).",
                        flag_values=flag_values)
    flags.DEFINE_string("suite", None, "bench: 'small', or a sweep recipe file.", flag_values=flag_values)
    flags.DEFINE_boolean("print-config", False, "train: print the resolved config and stop.", flag_values=flag_values)
    flags.DEFINE_boolean("dry-run", False, "train: build and check everything, train nothing.",
                         flag_values=flag_values)
    flags.DEFINE_string("topology", None, "train --compile-only: the TPU topology to compile for.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num-slices", None, "train --compile-only: slices of the topology.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_boolean("compile-only", False, "train: compile for --topology and report; train nothing.",
                         flag_values=flag_values)
    return flag_values


def _explain_bad_flag(flagname: str, argv) -> str:
    """Name the override that failed: a key the config does not have, or a value of the wrong type."""
    if not flagname.startswith("config."):
        known = [name for command in FLAGS.values() for name, _ in command]
        known = sorted({name.split()[0].split("=")[0].lstrip("-") for name in known} - {"config.KEY"})
        return f"unknown flag --{flagname}{did_you_mean(flagname, known)}; {USAGE}"
    config, error = _load_config_only(argv)
    if error is not None:
        return error
    for name in _override_keys(argv) + [flagname[len("config."):]]:
        problem = _missing_key(config, name)
        if problem:
            return problem
    return f"bad value for --{flagname}; give a value of the type the recipe uses for it"


def _explain_parse_failure(err, argv) -> str:
    config, error = _load_config_only(argv)
    if error is not None:
        return error
    for name in _override_keys(argv):  # config_flags says "no such key" with a bare AttributeError
        problem = _missing_key(config, name)
        if problem:
            return problem
    return f"could not apply the --config overrides: {type(err).__name__}: {first_line(err)}"


def _override_keys(argv) -> list:
    return [arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def _missing_key(config, key: str):
    node, path = config, []
    for part in key.split("."):
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = f"under {'.'.join(path)!r}" if path else "at the top level"
            listing = ", ".join(keys) if keys else "none: it is a value, not a section"
            guess = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            rest = key.split(".")[len(path) + 1:]
            guess = f" (did you mean {'.'.join(path + guess + rest)!r}?)" if guess else ""
            return f"unknown config key {key!r}{guess}; keys {where}: {listing}"
        node, path = node[part], path + [part]
    return None


def _load_config_only(argv):
    """``(config, None)`` for the config file alone, without overrides, or ``(None, message)`` saying
    why it does not load (the recipe's own error and line, in one line)."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None:
        return None, f"missing --config; {USAGE}"
    return load_recipe(path)


@contextlib.contextmanager
def _quiet_config_flags():
    """config_flags only logs a warning when get_config() returns None; load_recipe reports it instead."""
    def drop(record):
        return "did you forget a return statement" not in record.getMessage()

    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _help_text() -> str:
    lines = [USAGE, "", "Train staged networks with local parallelism (Laskin, Metz et al., arXiv 2012.03837).", ""]
    lines += [f"  {command:<24} {SUMMARIES[command]}" for command in COMMANDS]
    lines += [f"  {'launch':<24} run one lpjax train as N local processes: {PROG} launch -n N -- train ..."]
    lines += ["", f"{PROG} COMMAND --help lists a command's flags (and, for train, every config key).",
              f"{PROG} recipes lists the recipes and sweep suites that ship with lpjax."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    """One command's usage, what it does, its flags and, for train, every config key with its default."""
    lines = [f"usage: {USAGES[command]}", "", SUMMARIES[command][0].upper() + SUMMARIES[command][1:] + "."]
    if FLAGS[command]:
        lines += ["", "flags:"] + [f"  {flag:<24} {what}" for flag, what in FLAGS[command]]
    if command == "train":
        lines += ["", "config keys (--config.KEY=VALUE; default in brackets; details in lpjax/config/base.py):"]
        lines += config_key_lines()
    if command in ("train", "bench"):
        names = catalog.recipe_names() if command == "train" else catalog.suite_names()
        lines += ["", f"shipped {'recipes' if command == 'train' else 'suites'}: {', '.join(names) or 'none found'} "
                  f"(lpjax recipes describes them)"]
    return "\n".join(lines)


def config_key_lines() -> list:
    from lpjax.config import base as config_module

    described = _key_descriptions(config_module.__doc__ or "")
    flat = _flatten(config_module.base_config().to_dict())
    lines = []
    for key, default in flat.items():
        section = key.split(".")[0] + ".*"
        what = described.get(key) or described.get(section) or ""
        lines.append(f"  {key:<26} [{default!r}] {what}".rstrip())
    return lines


def _key_descriptions(doc: str) -> dict:
    """``{key: description}`` from the key table in lpjax/config/base.py's docstring."""
    found, key = {}, None
    for line in doc.splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            parts = line.strip().split(None, 1)
            key = parts[0]
            found[key] = parts[1] if len(parts) > 1 else ""
        elif key and line.startswith("     ") and line.strip():
            found[key] += " " + line.strip()
        else:
            key = None
    return {k: " ".join(v.split()) for k, v in found.items()}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fail(message: str, code: int = EXIT_USAGE, leave_at_once: bool = True) -> int:
    if leave_at_once:  # in a multi-process run: leave now, without the end-of-run barrier
        from lpjax.distributed.join import mark_failed

        mark_failed()
    message = " ".join(message.split())  # exactly one line, whatever the source message looked like
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code
