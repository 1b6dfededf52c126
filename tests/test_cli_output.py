"""What the command line tells the user: per-command help, the shipped recipes, --print-config,
--dry-run, the compile notice, and what a resumed or already finished run reports."""

import json

import pytest

from test_cli import REPO, TINY_CONFIG, run_cli, run_cli_many, tensorboard_scalars

HELP = {  # command: words its --help must show
    "train": ["usage: lpjax train", "--print-config", "--dry-run", "--workdir", "optimizer.learning_rate",
              "method.name", "model.builder", "mnist_resnet", "cifar10_resnet:110"],
    "bench": ["usage: lpjax bench", "--suite", "--workdir", "small", "tiny"],
    "plot": ["usage: lpjax plot", "--workdir", "curves.png"],
    "recipes": ["usage: lpjax recipes"],
}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.py"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def quick_runs(tiny_recipe, tmp_path_factory):
    """The commands that train nothing, each in its own process forked after one shared import."""
    outside = tmp_path_factory.mktemp("outside")  # not the checkout: recipes must come from the package
    commands = {f"help {c}": ([c, "--help"], REPO) for c in HELP}
    commands["recipes"] = (["recipes"], outside)
    commands["print-config"] = (["train", "--config", "mnist_mlp", "--config.dataset.name=digits", "--print-config"],
                                outside)
    commands["dry-run"] = (["train", f"--config={tiny_recipe}", "--dry-run", f"--workdir={outside / 'dry'}"], outside)

    results = dict(zip(commands, run_cli_many(list(commands.values()))))
    return results, outside


@pytest.mark.xdist_group("quick_runs")  # one worker runs the shared fixture (--dist loadgroup)
@pytest.mark.parametrize("command", sorted(HELP))
def test_each_command_has_its_own_help(quick_runs, command):
    result = quick_runs[0][f"help {command}"]
    assert result.returncode == 0, result.stderr
    for word in HELP[command]:
        assert word in result.stdout, (word, result.stdout)
    others = [f"usage: lpjax {other}" for other in HELP if other != command]
    assert not any(usage in result.stdout for usage in others)


@pytest.mark.xdist_group("quick_runs")
def test_recipes_lists_the_shipped_recipes_with_descriptions(quick_runs):
    result = quick_runs[0]["recipes"]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    demo = next(line for line in lines if line.split()[:1] == ["mnist_resnet"])
    assert "greedy local training of a small ResNet on MNIST-5k" in demo
    assert any(line.split()[:1] == ["small"] for line in lines)  # the sweep suites too
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    # a parametrised recipe: one line per variant, under the name `lpjax train --config` takes
    assert {"cifar10_resnet:18", "cifar10_resnet:32", "cifar10_resnet:110"} <= set(listed)
    resnet110 = next(line for line in lines if line.split()[:1] == ["cifar10_resnet:110"])
    assert "ResNet-110" in resnet110
    assert "common" not in listed and "cifar10_resnet" not in listed  # a helper module is not a recipe


@pytest.mark.xdist_group("quick_runs")
def test_print_config_prints_the_resolved_config_of_a_recipe_named_from_outside_the_checkout(quick_runs):
    result = quick_runs[0]["print-config"]
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["dataset"]["name"] == "digits" and config["method"]["name"] == "chunked"
    assert config["model"]["num_classes"] == 10  # filled in from the data, as config.json will hold it
    assert config["num_steps"] > 0 and config["stages"] == 2
    assert list(quick_runs[1].iterdir()) == []  # run there, and neither it nor --dry-run wrote anything


@pytest.mark.xdist_group("quick_runs")
def test_dry_run_builds_everything_and_writes_nothing(quick_runs):
    result = quick_runs[0]["dry-run"]
    assert result.returncode == 0, result.stderr
    assert "mlp2x32 (2 layers) on digits" in result.stdout
    assert "parameters per stage (body + head): 0: " in result.stdout
    assert "dry run" in result.stdout and "first step done" not in result.stdout
    assert not (quick_runs[1] / "dry").exists()


def test_compile_notice_then_resumed_and_finished_runs_say_what_they_ran(tiny_recipe, tmp_path):
    workdir = str(tmp_path / "run")
    first = run_cli("train", f"--config={tiny_recipe}", f"--workdir={workdir}")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert out.index("compiling") < out.index("first step done in") < out.index("final head")
    assert "| 6 steps in " in out
    again = run_cli("train", f"--config={tiny_recipe}", f"--workdir={workdir}")
    assert again.returncode == 0, again.stderr
    assert "already finished at step 6" in again.stdout and "compiling" not in again.stdout
    assert "already finished at step 6; no steps run" in again.stdout
    longer = run_cli("train", f"--config={tiny_recipe}", "--config.num_steps=9", f"--workdir={workdir}")
    assert longer.returncode == 0, longer.stderr
    assert "resumed from the checkpoint at step 6; 3 steps to go" in longer.stdout
    assert "| 3 steps (resumed at step 6, now at 9) in " in longer.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps_run"] == 3 and results["resumed_from_step"] == 6
    environment = results["environment"]
    assert {"jax", "flax", "optax", "orbax-checkpoint"} <= set(environment["versions"])
    assert environment["devices"]["count"] >= 1 and environment["backend"] == "cpu"
    assert environment["git_commit"] is None or len(environment["git_commit"].split("+")[0]) == 40

    # TensorBoard: per-stage learning rate, the final figures the hparams refer to, and the config
    scalars = tensorboard_scalars(tmp_path / "run" / "tb")
    assert [value for _, value in scalars["train/learning_rate/stage1"]][-1] == pytest.approx(1e-3)
    assert scalars["final/test_accuracy"][-1][1] == pytest.approx(results["final"]["test_accuracy"], rel=1e-6)
    events = b"".join(path.read_bytes() for path in (tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert b"_hparams_/experiment" in events and b"_hparams_/session_start_info" in events
    assert b"optimizer.learning_rate" in events and b"config/text_summary" in events
