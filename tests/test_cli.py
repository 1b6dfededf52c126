"""The `lpjax train` command end to end, run as a user runs it: in a subprocess.

Bad input must end with exactly one stderr line, exit code 2, no traceback, and no workdir.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# digits + a 2-layer MLP: the cheapest real training run there is.
TINY_CONFIG = textwrap.dedent("""
    from ml_collections.config_dict import placeholder

    from lpjax.config.build import base_config


    def get_config():
        config = base_config()
        config.dataset.name = "digits"
        config.model.name = "mlp"
        config.model.depth = 2
        config.model.width = 32
        config.model.num_classes = placeholder(int)
        config.stages = 2
        config.method.name = "chunked"
        config.batch_size = 32
        config.num_steps = 6
        config.log_every = 3
        config.eval_every = 3
        return config
""")

# (name, arguments (the tiny config unless they name one), words the one-line message must contain)
BAD_INPUTS = [
    ("unknown method", ["--config.method.name=sideways"], ["unknown method 'sideways'", "greedy"]),
    ("more stages than layers", ["--config.stages=5"], ["2 layers into 5 stages"]),
    ("head does not match labels", ["--config.model.num_classes=7"], ["7 classes", "num_classes=10"]),
    ("batch not divisible by microbatches", ["--config.schedule.microbatches=3"], ["not divisible", "32"]),
    ("window below one", ["--config.method.name=overlapping", "--config.method.window=0"], ["window", "0"]),
    ("shared readout with backprop", ["--config.method.name=backprop", "--config.method.shared_readout=True"],
     ["drop method.shared_readout"]),
    ("shared readout with streaming", ["--config.method.shared_readout=True", "--config.schedule.name=streaming"],
     ["flushing schedule"]),
    ("per-stage learning rates of the wrong length", ["--config.optimizer.learning_rates=(0.1,0.2,0.3)"],
     ["learning_rates has 3 entries for 2 stages"]),
    ("unknown config key", ["--config.optimizer.lr=0.1"], ["unknown config key 'optimizer.lr'", "learning_rate"]),
    ("unknown dataset", ["--config.dataset.name=imagenet"], ["unknown dataset 'imagenet'", "mnist5k"]),
    ("non-positive batch size", ["--config.batch_size=0"], ["batch_size", "positive"]),
    ("value of the wrong type", ["--config.batch_size=many"], ["batch_size", "many"]),
    ("missing config file", ["--config=does/not/exist.py"], ["could not load the config file", "exist.py"]),
    ("config file that raises", ["--config={configs}/broken.py"], ["broken.py: ZeroDivisionError", "line 2"]),
    ("layout larger than the devices", ["--config.layout.executor=mpmd", "--config.layout.data=64"],
     ["needs 128 devices", "JAX_NUM_CPU_DEVICES=128"]),
    ("batch not divisible by microbatches x data",
     ["--config.layout.executor=mpmd", "--config.layout.data=3", "--config.schedule.microbatches=2"],
     ["not divisible by microbatches x data = 6"]),
    ("reference executor given a data axis", ["--config.layout.data=2"], ["reference executor", "mpmd"]),
    ("dataset not set", ["--config.dataset.name="], ["dataset.name is not set", "digits"]),
    ("workdir under a file", ["--workdir={configs}/tiny.py/run"], ["not writable", "--workdir"]),
    ("window given to a window-1 method", ["--config.method.window=3"], ["window 1", "overlapping"]),
    ("loss weights given to backprop", ["--config.method.name=backprop", "--config.method.loss_weights=(1.0,1.0)"],
     ["backprop uses only the last head", "loss_weights"]),
    ("unknown non-finite policy", ["--config.nonfinite=ignore"], ["unknown nonfinite 'ignore'", "skip"]),
    ("flag of the wrong type", ["--config.checkpoint.asynchronous=maybe"], ["asynchronous", "maybe"]),
    ("negative checkpoint interval", ["--config.checkpoint.every_steps=-5"], ["checkpoint.every_steps", ">= 0"]),
    ("misspelled section", ["--config.optimzer.learning_rate=0.1"], ["did you mean 'optimizer.learning_rate'?"]),
    ("misspelled method", ["--config.method.name=gredy"], ["did you mean 'greedy'?"]),
    ("misspelled flag", ["--workdri=somewhere"], ["unknown flag --workdri", "did you mean 'workdir'?"]),
    # class: a number that is not finite or out of its range (inf passes "> 0"); every float key is checked
    ("infinite learning rate", ["--config.optimizer.learning_rate=inf"], ["optimizer.learning_rate", "finite"]),
    ("NaN learning rate", ["--config.optimizer.learning_rate=nan"], ["optimizer.learning_rate", "finite"]),
    ("infinite weight decay", ["--config.optimizer.weight_decay=inf"], ["optimizer.weight_decay", "finite"]),
    ("NaN momentum", ["--config.optimizer.momentum=nan"], ["optimizer.momentum", "finite"]),
    ("momentum of 1 or more", ["--config.optimizer.momentum=1.5"], ["optimizer.momentum", "[0, 1)"]),
    ("infinite clip norm", ["--config.optimizer.grad_clip_norm=inf"], ["optimizer.grad_clip_norm", "finite"]),
    ("overflowing per-stage learning rate", ["--config.optimizer.learning_rates=(0.1,1e999)"],
     ["optimizer.learning_rates", "finite", "inf"]),
    ("overflowing loss weight", ["--config.method.loss_weights=(1e999,1.0)"], ["method.loss_weights", "finite"]),
    ("negative infinite loss weight", ["--config.method.loss_weights=(1.0,-1e999)"], ["method.loss_weights", "finite"]),
    ("negative learning rate", ["--config.optimizer.learning_rate=-0.1"], ["optimizer.learning_rate", "> 0"]),
    # decision: a negative loss weight makes its stage climb its loss, so it is refused; 0 is allowed
    ("negative loss weight", ["--config.method.loss_weights=(-1.0,1.0)"], ["loss_weights[0]", "ascend its loss"]),
    ("all loss weights zero", ["--config.method.loss_weights=(0.0,0.0)"], ["all 0", "positive weight"]),
    # class: a size or count a model builder takes, below 1 (below 0 where the builder's default is 0)
    ("zero width", ["--config.model.width=0"], ["model.width must be an integer >= 1", "got 0"]),
    ("zero depth", ["--config.model.depth=0"], ["model.depth must be an integer >= 1"]),
    ("negative width", ["--config.model.width=-4"], ["model.width must be an integer >= 1", "-4"]),
    ("zero attention heads", ["--config=recipes/text_transformer.py", "--config.model.heads=0"],
     ["model.heads must be an integer >= 1"]),
    ("zero transformer width", ["--config=recipes/text_transformer.py", "--config.model.dim=0"],
     ["model.dim must be an integer >= 1"]),
    ("negative head convolutions", ["--config=recipes/mnist_resnet.py", "--config.dataset.max_train=256",
                                    "--config.model.head_conv=-1"], ["model.head_conv must be an integer >= 0"]),
    ("negative blocks in a stage", ["--config=recipes/mnist_resnet.py", "--config.dataset.max_train=256",
                                    "--config.model.blocks_per_stage=(2,-1,2,2)"],
     ["model.blocks_per_stage must hold integers >= 0", "(2, -1, 2, 2)"]),
    # class: a recipe file that does not give a config
    ("recipe whose get_config returns None", ["--config={configs}/none.py"], ["returned None", "return"]),
    ("recipe whose get_config returns a number", ["--config={configs}/number.py"], ["returned a value of type int"]),
    ("recipe calling sys.exit(3)", ["--config={configs}/exit3.py"], ["called sys.exit(3)", "line 3"]),
    ("recipe calling sys.exit() on import", ["--config={configs}/exit_on_import.py"], ["called sys.exit(0)", "line 2"]),
    ("recipe raising ValueError", ["--config={configs}/valueerror.py"], ["ValueError: no such size", "line 2"]),
    ("recipe whose get_config needs an argument", ["--config={configs}/needs_argument.py"],
     ["needs an argument", ":ARGUMENT"]),
    ("recipe without get_config", ["--config={configs}/no_get_config.py"], ["defines no get_config() function"]),
    ("config path that is a directory", ["--config={configs}"], ["it is not a file"]),
    # class: a parametrised recipe (get_config(arg)) given no argument, or one it does not take
    ("parametrised recipe without its argument", ["--config=cifar10_resnet"],
     ["cifar10_resnet takes the depth as its argument", "got no argument"]),
    ("parametrised recipe with an unknown argument", ["--config=cifar10_resnet:7"], ["one of 32, 110, 18", "got '7'"]),
    # class: a --workdir path the filesystem cannot hold, refused before any directory is made
    ("workdir name too long", ["--workdir={workdir}/" + "n" * 300], ["300 bytes", "shorter --workdir"]),
    ("workdir path too long", ["--workdir={workdir}/" + "/".join(["d" * 250] * 20)], ["bytes long", "shorter --workdir"]),
]


def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value)]} from the TensorBoard event files in ``folder`` (TFRecord framing: length,
    its CRC, the serialized Event, its CRC), read with tensorboardX's own protobuf classes."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def run_cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "lpjax", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def run_cli_many(commands):
    """``run_cli`` for each ``(args, cwd)``, each still its own process, but forked from one that has
    imported lpjax already (tests/support/cli_forks.py): the import is most of a failing command's cost."""
    with tempfile.TemporaryDirectory() as folder:
        cases = Path(folder) / "cases.json"
        cases.write_text(json.dumps([[str(cwd), [str(arg) for arg in args]] for args, cwd in commands]))
        driver = subprocess.run([sys.executable, str(REPO / "tests" / "support" / "cli_forks.py"), str(cases)], cwd=REPO,
                                env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                                timeout=600)
    assert driver.returncode == 0, driver.stderr
    return [subprocess.CompletedProcess(["lpjax", *args], code, stdout, stderr)
            for (args, _), (code, stdout, stderr) in zip(commands, json.loads(driver.stdout))]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / "broken.py").write_text("def get_config():\n    return 1 / 0\n")
    (folder / "none.py").write_text("def get_config():\n    config = 1\n")
    (folder / "number.py").write_text("def get_config():\n    return 5\n")
    (folder / "exit3.py").write_text("import sys\ndef get_config():\n    sys.exit(3)\n")
    (folder / "exit_on_import.py").write_text("import sys\nsys.exit(0)\n")
    (folder / "valueerror.py").write_text("def get_config():\n    raise ValueError('no such size')\n")
    (folder / "needs_argument.py").write_text("def get_config(size):\n    return size\n")
    (folder / "no_get_config.py").write_text("config = None\n")
    path = folder / "tiny.py"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def bad_runs(tiny_config, tmp_path_factory):
    """Every bad-input command, each in its own process forked after one shared import."""
    root = tmp_path_factory.mktemp("bad")
    workdirs, commands = [], []
    for name, args, _ in BAD_INPUTS:
        workdir = root / "".join(c if c.isalnum() else "_" for c in name)
        args = [arg.format(configs=tiny_config.parent, workdir=workdir) for arg in args]
        if not any(arg.startswith("--config=") for arg in args):
            args = [f"--config={tiny_config}", *args]
        if not any(arg.startswith("--workdir=") for arg in args):
            args.append(f"--workdir={workdir}")
        workdirs.append(workdir)
        commands.append((["train", *args], REPO))
    results = run_cli_many(commands)
    return {case[0]: (workdir, result) for case, workdir, result in zip(BAD_INPUTS, workdirs, results)}


@pytest.mark.xdist_group("bad_runs")
def test_a_forked_command_says_what_a_fresh_process_says(bad_runs, tiny_config):
    """The forked runs above stand for ``python -m lpjax``: one bad input of each kind (found by the
    flag parser, by the config checks, by the recipe loader) gives the same output both ways."""
    for name in ("unknown method", "misspelled flag", "config file that raises"):
        workdir, forked = bad_runs[name]
        fresh = run_cli(*forked.args[1:])
        assert (fresh.returncode, fresh.stdout, fresh.stderr) == (forked.returncode, forked.stdout, forked.stderr)


@pytest.mark.xdist_group("bad_runs")  # one worker runs the shared fixture (make test: --dist loadgroup)
@pytest.mark.parametrize("name, args, words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(bad_runs, name, args, words):
    workdir, result = bad_runs[name]
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lpjax: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not workdir.exists()


def test_train_writes_metrics_results_and_prints_table(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", "--config", "recipes/mnist_mlp.py", "--config.dataset.name=digits",
                     "--config.dataset.test_size=300", "--config.model.width=32", "--config.num_steps=8",
                     "--config.log_every=4", "--config.eval_every=4", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in train] == [4, 8]
    assert [r["step"] for r in test] == [4, 8]
    for record in records:
        assert len(record["loss"]) == len(record["accuracy"]) == 2  # the recipe's two chunks
        assert all(loss > 0 for loss in record["loss"])
        assert record["time"] >= 0
    for record in train:  # per-stage health and speed beside loss and accuracy
        assert all(norm > 0 for norm in record["grad_norm"]) and record["skipped"] == [0, 0]
        assert all(rate > 0 for rate in record["examples_per_s"])

    scalars = tensorboard_scalars(workdir / "tb")
    assert {"train/loss/stage0", "train/grad_norm/stage1", "train/examples_per_s/stage1",
            "test/accuracy/stage1"} <= set(scalars)
    assert [step for step, _ in scalars["train/loss/stage1"]] == [4, 8]
    assert scalars["train/loss/stage1"][-1][1] == pytest.approx(train[-1]["loss"][1], rel=1e-6)

    results = json.loads((workdir / "results.json").read_text())
    assert results["method"] == "chunked" and results["num_steps"] == 8
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    assert [s["layers"] for s in results["stages"]] == [[0, 1], [2, 3]]
    assert results["final"] == results["stages"][-1]
    assert results["final"]["test_accuracy"] == pytest.approx(test[-1]["accuracy"][-1])
    assert 0.0 <= results["final"]["test_accuracy"] <= 1.0

    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"]["name"] == "digits"
    assert config["model"]["num_classes"] == 10  # filled in from the data
    assert config["num_steps"] == 8 and config["stages"] == 2

    assert "test acc" in result.stdout and "final head (stage 1)" in result.stdout


def test_no_command_prints_usage_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "usage: lpjax train --config" in result.stderr
