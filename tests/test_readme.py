"""README.md as a user reads it: its Python examples run as written, every ``lpjax ...`` command it
names exists with the flags and config keys it uses, and its "Layout of the code" names the package's
layers as they are.

The Python blocks run in order, in one namespace, from an empty directory (as docs/extending.md's
do in tests/test_extending.py), with one change stated in ``FEWER_STEPS``: the step counts, which
make the example meaningful but add nothing to what it checks."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from lpjax.config import catalog
from lpjax.config.recipe_file import load_recipe
from test_cli import run_cli_many

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")

# The only edits made to README's Python before running it: 300 steps become 30 (and the evaluation
# interval shrinks with them), so that the examples take seconds. Each must match exactly once.
FEWER_STEPS = {"range(300)": "range(30)", "steps=300": "steps=30", "eval_every=100": "eval_every=10"}

# Words in README's commands that stand for what the reader fills in.
PLACEHOLDERS = ("...", "NAME", "DIR", "my_recipe.py")


def python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    source = "\n".join(python_blocks())
    for old, new in FEWER_STEPS.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile(source, str(REPO / "README.md"), "exec"), namespace)

    out = capsys.readouterr().out
    accuracies = [float(a) for a in re.findall(r"stage \d: test accuracy ([0-9.]+)", out)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.5  # three stages, the last a usable classifier
    logits = namespace["logits"]
    assert len(logits) == 3 and all(np.shape(stage) == (8, 10) for stage in logits)  # anytime: one per stage

    # lpjax.fit: the run machinery's files, and the trained parameters left in the model
    results, trainer, model, data = (namespace[name] for name in ("results", "trainer", "model", "data"))
    assert results["final"]["test_accuracy"] > 0.5
    run = tmp_path / "runs" / "my_model"
    assert (run / "results.json").is_file() and (run / "metrics.jsonl").is_file() and (run / "checkpoints").is_dir()
    for mine, trainers in zip(model(data.test_x[:8]), trainer.predict(data.test_x[:8])):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(trainers), rtol=1e-5, atol=1e-5)


def commands() -> list:
    """Every ``lpjax ...`` command line in README: shell blocks (continuation lines joined, comments
    dropped), indented command lines and inline code, each from its ``lpjax`` to the end of the line
    (or of the quoted command it sits in)."""
    text = README.replace("\\\n", " ")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.split(" # ")[0] for line in block.splitlines()]
    lines += [line for line in text.splitlines() if line.startswith("    ") and "lpjax " in line]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [span for paragraph in prose.split("\n\n") for span in paragraph.split("`")[1::2] if "lpjax " in span]
    found = []
    for line in lines:
        for match in re.finditer(r"(?<![\w/.-])lpjax (?=[a-z.])", line):
            found.append(re.split(r'"|&&', line[match.start():])[0].strip())
    return found


@pytest.fixture(scope="module")
def helps():
    """What ``lpjax --help`` and each command's ``--help`` print (stdout and stderr together)."""
    names = ["", "train", "bench", "plot", "recipes", "launch"]
    results = run_cli_many([([name, "--help"] if name else ["--help"], REPO) for name in names])
    return {name: result.stdout + result.stderr for name, result in zip(names, results)}


def test_readme_names_commands_of_every_kind():
    named = {shlex.split(command)[1] for command in commands() if len(shlex.split(command)) > 1}
    assert {"train", "bench", "plot", "recipes", "launch"} <= named


@pytest.mark.parametrize("command", sorted(set(commands())))
def test_every_command_the_readme_names_exists(command, helps):
    words = shlex.split(command)[1:]
    while words:  # `lpjax launch ... -- train ...` runs a second command
        words = _check_one(command, words, helps)


def _check_one(command, words, helps) -> list:
    name, args = words[0], words[1:]
    listed = re.findall(r"^  (\w+) ", helps[""], flags=re.M)
    if name == "...":
        return []
    assert name in listed, f"{command}: `lpjax {name}` is not a command ({', '.join(listed)})"
    recipe = None
    for i, arg in enumerate(args):
        if arg == "--":
            return args[i + 1:]
        if arg in ("--config", "--suite") and i + 1 < len(args):
            given = args[i + 1]
            if not any(p in given for p in PLACEHOLDERS):
                if arg == "--suite":
                    assert given in catalog.suite_names() or (REPO / given).is_file(), f"{command}: suite {given}"
                else:
                    config, reason = load_recipe(catalog.find_recipe(given))
                    assert reason is None, f"{command}: {reason}"
                    recipe = config
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=")[0]
            in_help = re.search(rf"^  {re.escape(key)} ", helps["train"], flags=re.M)
            assert in_help or _has_key(recipe, key), f"{command}: no config key {key}"
        elif arg.startswith("-") and arg not in ("-", "--config", "--help"):  # every command takes --help
            flag = arg.split("=")[0]
            assert re.search(re.escape(flag) + r"(?![\w-])", helps[name]), f"{command}: `lpjax {name}` has no flag {flag}"
    return []


def _has_key(config, key) -> bool:
    node = config
    for part in key.split("."):
        if node is None or not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def test_the_layout_section_names_every_layer_of_the_package():
    section = README.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `lpjax/(\w+)/` \|", section, flags=re.M))
    packages = {path.parent.name for path in (REPO / "lpjax").glob("*/__init__.py")}
    assert named == packages
    for rule in ("`core` imports nothing", "`executors` import only `core`", "private (`_name`) names",
                 "450 lines", "lpjax.models", "lpjax.recipes"):
        assert rule in section, rule
