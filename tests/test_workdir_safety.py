"""Nothing lost, nothing silent: one writer per workdir (two real processes), malformed workdir contents,
an edited checkpoint meta, a full disk, and `lpjax plot` on bad files."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lpjax import cli
from lpjax.training.checkpoint import META_FINGERPRINT, Checkpointer
from lpjax.config.build import build_experiment
from lpjax.errors import ConfigError
from lpjax.training.lock import WorkdirLock
from tiny import digits_recipe

REPO = Path(__file__).resolve().parents[1]

RECIPE = digits_recipe(dataset__test_size=300, optimizer__decay="constant", num_steps=6, log_every=3,
                       checkpoint__every_steps=3)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.py"
    path.write_text(RECIPE)
    return path


def environment():
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")


def train_command(recipe, workdir, *extra):
    return [sys.executable, "-m", "lpjax", "train", f"--config={recipe}", *extra, f"--workdir={workdir}"]


def snapshot(folder: Path) -> dict:
    """Every file's bytes and every directory under ``folder``: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def final_states(workdir):
    config = json.loads((Path(workdir) / "config.json").read_text())
    trainer = build_experiment(config).trainer
    restored = Checkpointer(str(Path(workdir) / "checkpoints"), trainer.num_stages).restore_latest(trainer.stage_states)
    states, meta = restored
    return meta["step"], jax.device_get([(s.params, s.rest, s.opt_state) for s in states])


def assert_same_states(a, b):
    assert a[0] == b[0]
    leaves_a, leaves_b = jax.tree.leaves(a[1]), jax.tree.leaves(b[1])
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("lpjax:")]


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6; tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["lpjax", "train", f"--config={recipe}", f"--workdir={workdir}"]) == 0
    return workdir


# -- one writer per workdir ---------------------------------------------------------------------------------
def wait_for_lock_holder(workdir: Path, process, timeout=240.0):
    lock = workdir / "lock"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if lock.exists() and lock.read_text().strip():
            return json.loads(lock.read_text())
        time.sleep(0.05)
    raise AssertionError(f"the first run never took the lock (exit code {process.poll()})")


def test_a_second_run_on_a_locked_workdir_is_refused_and_the_first_ends_bit_exact(recipe, tmp_path):
    """The first run is paused (SIGSTOP) while it holds the lock, so the second is sure to meet it."""
    reference = subprocess.run(train_command(recipe, tmp_path / "alone"), env=environment(), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    shared = tmp_path / "shared"
    first = subprocess.Popen(train_command(recipe, shared), env=environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_lock_holder(shared, first)
        assert holder == {"pid": first.pid, "host": socket.gethostname()}
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(train_command(recipe, shared), env=environment(), capture_output=True, text=True,
                                timeout=300)
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lpjax: error: workdir"), second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
    assert "Traceback" not in second.stderr + second.stdout

    assert first.returncode == 0, err
    assert "warning" not in err
    assert_same_states(final_states(tmp_path / "alone"), final_states(shared))
    assert (shared / "lock").read_text() == ""  # released: the next run has nobody to warn about
    leftovers = [p.name for p in shared.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(recipe, tmp_path):
    """SIGKILL: the kernel drops the dead run's flock, the file still names it, and the next run
    takes over, warns once, and resumes."""
    workdir = tmp_path / "run"
    killed = subprocess.Popen(train_command(recipe, workdir, "--config.num_steps=3000"), env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        holder = wait_for_lock_holder(workdir, killed)
        deadline = time.time() + 240
        while not (workdir / "checkpoints" / "3").is_dir() and time.time() < deadline and killed.poll() is None:
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
    assert holder["pid"] == killed.pid
    assert json.loads((workdir / "lock").read_text())["pid"] == killed.pid  # the dead run is still named

    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    resumed = subprocess.run(train_command(recipe, workdir, f"--config.num_steps={newest + 3}"), env=environment(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("lpjax: warning:")]
    assert len(warnings) == 1 and "taking over the lock" in warnings[0], resumed.stderr
    assert f"pid {killed.pid} on host {socket.gethostname()}" in warnings[0]
    assert "resumed from the checkpoint at step" in resumed.stdout


def test_the_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(ConfigError, match=f"in use by another lpjax run \\(pid {os.getpid()} on host "):
            WorkdirLock(str(tmp_path)).acquire()
    with WorkdirLock(str(tmp_path)):  # released on exit, so it can be taken again
        pass


# -- workdir contents checked before anything is written -------------------------------------------------------
def with_checkpoints(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def fresh(trained, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    return workdir


def break_it(how):
    def apply(workdir: Path):
        target = workdir / how[0]
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if how[1] == "dir":
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(how[1])
    return apply


# (name, workdir to start from, change, extra flags, words the one line must contain)
MALFORMED_WORKDIRS = [
    ("checkpoints is a file", fresh, break_it(("checkpoints", b"x")), [], ["checkpoints is not a directory"]),
    ("a checkpoint step is a plain file", fresh, break_it(("checkpoints/6", b"x")), [],
     ["checkpoints/6 is a file, not a checkpoint directory"]),
    ("tb is a file", fresh, break_it(("tb", b"x")), [], ["tb is not a directory"]),
    ("corrupt is a file", fresh, break_it(("corrupt", b"x")), [], ["corrupt is not a directory"]),
    ("metrics.jsonl is a directory", fresh, break_it(("metrics.jsonl", "dir")), [], ["metrics.jsonl is not a file"]),
    ("config.json is a directory", fresh, break_it(("config.json", "dir")), [], ["config.json is not a file"]),
    ("lock is a directory", fresh, break_it(("lock", "dir")), [], ["lock is not a file"]),
    ("config.json is a JSON list", with_checkpoints, break_it(("config.json", b"[1, 2]\n")), [],
     ["holds a JSON list, not the object"]),
    ("config.json is a JSON string", with_checkpoints, break_it(("config.json", b'"run"\n')), [],
     ["holds a JSON str"]),
    ("config.json is not UTF-8", with_checkpoints, break_it(("config.json", b"\xff\xfe{}")), [],
     ["no readable config.json"]),
    ("num_steps below the newest checkpoint", with_checkpoints, lambda w: None, ["--config.num_steps=4"],
     ["checkpoint at step 6, past num_steps=4", "--config.num_steps=6"]),
]


@pytest.mark.parametrize("name, start, change, extra, words", MALFORMED_WORKDIRS, ids=[c[0] for c in MALFORMED_WORKDIRS])
def test_a_malformed_workdir_is_one_line_exit_2_and_left_as_it_was(recipe, trained, tmp_path, capsys, name, start,
                                                                    change, extra, words):
    workdir = start(trained, tmp_path)
    change(workdir)
    before = snapshot(workdir)
    code = cli.main(["lpjax", "train", f"--config={recipe}", *extra, f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("lpjax: error: "), err
    for word in words:
        assert word in err, err
    assert snapshot(workdir) == before


def test_metrics_that_are_not_utf8_still_resume(recipe, trained, tmp_path, capsys):
    """Damaged bytes in metrics.jsonl: the records before them are kept, the rest rewritten."""
    workdir = with_checkpoints(trained, tmp_path)
    lines = (workdir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_bytes(lines[0] + b'{"step": 3, "spl\xff\xfe\n' + b"".join(lines[1:]))
    shutil.rmtree(workdir / "checkpoints" / "6")
    assert cli.main(["lpjax", "train", f"--config={recipe}", f"--workdir={workdir}"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(3, "train"), (6, "train"), (6, "test")]


# -- an edited meta is caught by its fingerprint --------------------------------------------------------------
def edit_meta(change):
    def apply(meta):
        change(meta)
        return meta
    return apply


META_EDITS = [
    ("data position moved by one", edit_meta(lambda m: m["data_state"].update(next_index=m["data_state"]["next_index"] + 1))),
    ("step changed", edit_meta(lambda m: m.update(step=5))),
    ("state fingerprint changed", edit_meta(lambda m: m["fingerprints"].__setitem__(0, m["fingerprints"][0] + 1))),
    ("config value changed", edit_meta(lambda m: m["config"]["optimizer"].update(learning_rate=0.5))),
    ("a key removed", edit_meta(lambda m: m.pop("data_state"))),
    ("fingerprint removed", edit_meta(lambda m: m.pop(META_FINGERPRINT))),
    ("not an object", lambda m: [m]),
]


@pytest.mark.parametrize("name, edit", META_EDITS, ids=[c[0] for c in META_EDITS])
def test_an_edited_meta_falls_back_to_the_checkpoint_before(trained, tmp_path, capfd, name, edit):
    workdir = with_checkpoints(trained, tmp_path)
    meta_file = workdir / "checkpoints" / "6" / "meta" / "metadata"
    meta_file.write_text(json.dumps(edit(json.loads(meta_file.read_text()))))
    capfd.readouterr()
    step, _ = final_states(workdir)
    err = capfd.readouterr().err
    assert step == 3
    assert "lpjax: warning: checkpoint at step 6 is damaged (its meta item" in err, err
    assert (workdir / "corrupt" / "6").is_dir()
    assert "Traceback" not in err and "Exception ignored" not in err


def test_an_edited_data_position_resumes_from_the_checkpoint_before_and_ends_bit_exact(recipe, trained, tmp_path,
                                                                                      capsys):
    """The issue's case: the data position moved by one resumed silently, off by up to 8e-3."""
    workdir = with_checkpoints(trained, tmp_path)
    meta_file = workdir / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["data_state"]["next_index"] += 1
    meta_file.write_text(json.dumps(meta))
    assert cli.main(["lpjax", "train", f"--config={recipe}", f"--workdir={workdir}"]) == 0
    captured = capsys.readouterr()
    assert "resumed from the checkpoint at step 3" in captured.out
    assert len(error_lines(captured.err)) == 1 and "damaged (its meta item" in captured.err
    assert_same_states(final_states(trained), final_states(workdir))


@pytest.mark.parametrize("contents", ["empty", "unfinished"])
def test_a_step_folder_without_a_checkpoint_is_set_aside_and_never_blocks_the_run(recipe, trained, tmp_path, capsys,
                                                                                   contents):
    """The issue's case: an empty checkpoints/60 in a workdir whose run has 6 steps was taken for a
    checkpoint past num_steps and refused the run."""
    workdir = with_checkpoints(trained, tmp_path)
    folder = workdir / "checkpoints" / "60"
    folder.mkdir()
    if contents == "unfinished":  # an item, but no meta: not a checkpoint lpjax wrote to the end
        shutil.copytree(workdir / "checkpoints" / "6" / "stage0", folder / "stage0")
    assert cli.main(["lpjax", "train", f"--config={recipe}", f"--workdir={workdir}"]) == 0
    captured = capsys.readouterr()
    assert "already finished at step 6" in captured.out
    warnings = error_lines(captured.err)
    assert warnings == [f"lpjax: warning: step folder 60 holds no complete checkpoint (it is empty or unfinished); "
                        f"moved it to {workdir / 'corrupt' / '60'} and falling back to the one before"]
    assert not folder.exists() and (workdir / "corrupt" / "60").is_dir()


def test_an_empty_step_folder_in_a_new_workdir_is_set_aside_and_training_starts(recipe, tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "60").mkdir(parents=True)
    assert cli.main(["lpjax", "train", f"--config={recipe}", f"--workdir={workdir}"]) == 0
    captured = capsys.readouterr()
    assert "resumed" not in captured.out and "step folder 60 holds no complete checkpoint" in captured.err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def test_orbax_noise_after_a_fallback_is_silenced(recipe, trained, tmp_path):
    """A damaged array-metadata file left orbax reads in flight; each printed an 'Event loop is closed'
    traceback (15 of them) after the fallback warning."""
    workdir = with_checkpoints(trained, tmp_path)
    (workdir / "checkpoints" / "6" / "stage0" / "array_metadatas" / "process_0").write_text("{")
    result = subprocess.run(train_command(recipe, workdir), env=environment(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert len(error_lines(result.stderr)) == 1 and "checkpoint at step 6 is damaged" in result.stderr


# -- a full disk ----------------------------------------------------------------------------------------------
def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and mount (root or user namespaces) for a small tmpfs")
def test_a_full_disk_is_one_line_exit_1_keeps_the_last_checkpoint_and_rerunning_resumes(recipe, tmp_path):
    """A real small filesystem (a private tmpfs): room for the run and its first checkpoint, not for the
    second. Then the same command, with space back, resumes and ends bit-exact."""
    mount = tmp_path / "small"
    mount.mkdir()
    common = ["--config.num_steps=20", "--config.log_every=5", "--config.checkpoint.every_steps=10"]
    reference = subprocess.run(train_command(recipe, tmp_path / "reference", *common), env=environment(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    first = " ".join(train_command(recipe, mount / "run", *common))
    script = (f"mount -t tmpfs -o size=270k tmpfs {mount} && {{ {first} > {tmp_path}/full.out 2> {tmp_path}/full.err; "
              f"echo $? > {tmp_path}/full.rc; ls {mount}/run/checkpoints > {tmp_path}/full.ls; "
              f"mount -o remount,size=4m {mount} && {first} > {tmp_path}/again.out 2> {tmp_path}/again.err; "
              f"echo $? > {tmp_path}/again.rc; cp -r {mount}/run {tmp_path}/copy; }}")
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=environment(), timeout=900, check=True)

    err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("lpjax: error: could not write the checkpoint at step 20 in "), lines[0]
    assert "No space left on device" in lines[0] and "free there" in lines[0]
    assert "it resumes from the checkpoint at step 10" in lines[0]
    assert "Traceback" not in err and "ERROR:absl" not in err
    assert "10" in (tmp_path / "full.ls").read_text().split()  # the newest good checkpoint is intact

    assert (tmp_path / "again.rc").read_text().strip() == "0", (tmp_path / "again.err").read_text()
    assert "resumed from the checkpoint at step 10" in (tmp_path / "again.out").read_text()
    assert_same_states(final_states(tmp_path / "reference"), final_states(tmp_path / "copy"))


def test_a_full_disk_while_logging_metrics_is_one_line_exit_1(recipe, tmp_path, capsys, monkeypatch):
    """ENOSPC injected at the metrics log's write (portable: no filesystem needed)."""
    import errno

    from lpjax.training import metrics_log

    workdir = tmp_path / "run"
    real_write = metrics_log.MetricsLog._write

    def write(self, step, *args, **kwargs):
        if step >= 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, step, *args, **kwargs)

    monkeypatch.setattr(metrics_log.MetricsLog, "_write", write)
    code = cli.main(["lpjax", "train", f"--config={recipe}", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert f"could not write the metrics log and TensorBoard events in {workdir / 'metrics.jsonl'}" in lines[0]
    assert "No space left on device" in lines[0] and "free some space, then rerun the same command" in lines[0]
    assert "it resumes from the checkpoint at step 3" in lines[0]
    assert (workdir / "checkpoints" / "3").is_dir()


# -- lpjax plot on bad files -------------------------------------------------------------------------------------
GOOD = {"step": 3, "time": 0.1, "split": "train", "loss": [2.0, 2.1], "accuracy": [0.2, 0.1]}
PLOTTABLE_DESPITE = [
    ("bytes that are not UTF-8", b"\xff\xfe\x00garbage\n"),
    ("a JSON line that is not an object", b"[1, 2, 3]\n"),
    ("a JSON number", b"5\n"),
    ("a null loss", json.dumps(dict(GOOD, step=4, loss=None)).encode() + b"\n"),
    ("a loss that is a string", json.dumps(dict(GOOD, step=5, loss="low")).encode() + b"\n"),
    ("a step that is not a number", json.dumps(dict(GOOD, step="six")).encode() + b"\n"),
    ("a cut-short line", b'{"step": 7, "spl'),
]


@pytest.mark.parametrize("name, bad", PLOTTABLE_DESPITE, ids=[c[0] for c in PLOTTABLE_DESPITE])
def test_plot_skips_records_it_cannot_draw(tmp_path, capsys, name, bad):
    good = json.dumps(GOOD).encode() + b"\n" + json.dumps(dict(GOOD, step=6, split="test")).encode() + b"\n"
    (tmp_path / "metrics.jsonl").write_bytes(good + bad)
    assert cli.main(["lpjax", "plot", f"--workdir={tmp_path}"]) == 0, capsys.readouterr().err
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_plot_with_nothing_drawable_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\n[1]\n" + json.dumps(dict(GOOD, loss=None)).encode() + b"\n")
    assert cli.main(["lpjax", "plot", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds no train or test records" in err


def test_plot_into_a_directory_named_curves_png_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "curves.png").mkdir()
    assert cli.main(["lpjax", "plot", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot write" in err and "curves.png" in err


@pytest.mark.skipif(os.geteuid() == 0 and not can_mount_tmpfs(), reason="root ignores file modes; needs a read-only mount")
def test_plot_on_a_read_only_workdir_is_one_line_exit_2(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GOOD) + "\n")
    plot = f"{sys.executable} -m lpjax plot --workdir={tmp_path}"
    if os.geteuid() == 0:  # a read-only bind mount, in a private mount namespace
        command = ["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path} {tmp_path} && "
                   f"mount -o remount,ro,bind {tmp_path} && {plot}"]
    else:
        tmp_path.chmod(0o555)
        command = plot.split()
    try:
        result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lpjax: error: cannot write"), result.stderr
    assert not (tmp_path / "curves.png").exists()


def test_a_tensorstore_full_disk_error_is_recognised_as_one():
    """Which write meets the full disk first varies: a Python one raises OSError, a tensorstore one a
    ValueError that carries the errno in its text (this one was met in the tmpfs test above)."""
    import errno

    from lpjax.training.workdir import os_error_in

    message = ('RESOURCE_EXHAUSTED: Error writing local file "/x/checkpoints/20.orbax-checkpoint-tmp/stage0/'
               '_sharding": Failed to write 1875 bytes to file 5: No space left on device [os_error_code=\'28\']')
    try:
        try:
            raise ValueError(message)
        except ValueError as inner:
            raise RuntimeError("Save Finalize thread (save_finalize) failed.") from inner
    except RuntimeError as outer:
        found = os_error_in(outer)
    assert found.errno == errno.ENOSPC and found.strerror == os.strerror(errno.ENOSPC)
    assert os_error_in(RuntimeError("unrelated")) is None


def test_an_abandoned_orbax_task_is_silenced_whatever_its_repr_names(capfd):
    """asyncio reports a task whose exception nobody retrieved with the task's repr, which does not
    always name the coroutine's file (CI met one after a full disk); the traceback always does."""
    import asyncio
    import gc
    import logging

    from lpjax.training import process_hooks

    process_hooks.install()
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    namespace = {}
    exec(compile("async def write_fragment():\n    raise ValueError('No space left on device')\n", orbax_file, "exec"),
         namespace)

    async def abandon(coroutine):
        task = asyncio.ensure_future(coroutine)
        await asyncio.sleep(0)
        del task

    async def wrapped():  # a coroutine outside orbax that awaits orbax's: the task's repr names this file
        await namespace["write_fragment"]()

    handler = logging.StreamHandler()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        asyncio.run(abandon(wrapped()))
        gc.collect()
        captured = capfd.readouterr()
        assert "never retrieved" not in captured.err and "Traceback" not in captured.err, captured.err

        async def elsewhere():
            raise ValueError("not orbax")

        asyncio.run(abandon(elsewhere()))
        gc.collect()
        assert "never retrieved" in capfd.readouterr().err  # every other error still prints
    finally:
        logging.getLogger("asyncio").removeHandler(handler)


@pytest.mark.parametrize("command", [["train", f"--config={REPO / 'recipes' / 'mnist_mlp.py'}"], ["bench", "--suite=small"],
                                     ["plot"]],
                         ids=["train", "bench", "plot"])
def test_a_bucket_url_as_workdir_is_one_line_exit_2_naming_the_mount(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local filesystem would have made ./gs:/bucket/run here
    code = cli.main(["lpjax", *command, "--workdir=gs://bucket/run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("lpjax: error: "), err
    assert "gs:// URL" in err and "gcsfuse" in err and "--workdir" in err, err
    assert list(tmp_path.iterdir()) == []


def test_fit_refuses_a_bucket_url_before_writing(tmp_path, monkeypatch):
    import optax

    import lpjax
    from tiny import tiny_batch, tiny_model

    monkeypatch.chdir(tmp_path)
    x, y = tiny_batch(16)
    trainer = lpjax.Trainer(tiny_model(2), method=lpjax.Greedy(), optimizer=optax.sgd(0.1))
    with pytest.raises(ConfigError, match="s3:// URL.*mount the bucket"):
        lpjax.fit(trainer, (x, y, x, y), workdir="s3://bucket/run", steps=1, batch_size=8)
    assert list(tmp_path.iterdir()) == []
