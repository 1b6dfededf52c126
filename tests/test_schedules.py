"""Properties of the schedules' task tables (DESIGN.md §4), checked without running anything.

Every table is checked over a grid of stage counts, microbatches per step, steps and with or without
a backward phase, so a schedule change that breaks an ordering or a statistic for one shape shows up.
"""

import functools
import itertools
from fractions import Fraction

import pytest

import lpjax
from lpjax.schedules import BACKWARD, FORWARD, LOCAL, GPipe, Sequential, Streaming, TaskTable, make_schedule

SCHEDULES = {"sequential": Sequential, "gpipe": GPipe, "streaming": Streaming}
GRID = list(itertools.product(SCHEDULES, [1, 2, 3, 4, 8], [1, 2, 4, 8], [1, 3], [True, False]))
GRID_IDS = [f"{name}-K{k}-M{m}-steps{s}-{'bwd' if b else 'fwd'}" for name, k, m, s, b in GRID]


def cases(keep=lambda name, backward: True):
    """Parametrize over the grid cells that ``keep(name, backward)`` selects."""
    chosen = [(case, case_id) for case, case_id in zip(GRID, GRID_IDS) if keep(case[0], case[4])]
    return pytest.mark.parametrize("name,stages,micro,steps,backward",
                                   [c for c, _ in chosen], ids=[i for _, i in chosen])


grid = cases()


def only(schedule_name):
    return cases(lambda name, backward: name == schedule_name)


@functools.cache
def table_for(name, stages, micro, steps, backward):
    return SCHEDULES[name](micro).table(stages, steps, backward=backward)


def clock_of(table):
    """``(stage, microbatch, phase) -> clock`` for every task; fails on a duplicate."""
    where = {}
    for c, clock in enumerate(table.clocks):
        for task in clock:
            if task is not None:
                key = (task.stage, task.microbatch, task.phase)
                assert key not in where, f"{key} runs twice, at clocks {where[key]} and {c}"
                where[key] = c
    return where


def phases(name, backward):
    """The phases each microbatch goes through at every stage."""
    if name == "streaming":
        return (LOCAL,)  # forward and the delayed backward are one task; `backward` changes nothing
    return (FORWARD, BACKWARD) if backward else (FORWARD,)


# -- shape of the table ----------------------------------------------------------------------

@grid
def test_each_clock_has_one_slot_per_stage(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    assert table.num_stages == stages
    for clock in table.clocks:
        assert len(clock) == stages
        assert any(task is not None for task in clock), "an all-idle clock is pure waste"
        for k, task in enumerate(clock):
            assert task is None or task.stage == k


@grid
def test_every_microbatch_visits_every_stage_once_per_phase(name, stages, micro, steps, backward):
    where = clock_of(table_for(name, stages, micro, steps, backward))
    expected = {(k, m, phase) for k in range(stages) for m in range(steps * micro)
                for phase in phases(name, backward)}
    assert set(where) == expected


@grid
def test_forward_runs_in_stage_order(name, stages, micro, steps, backward):
    where = clock_of(table_for(name, stages, micro, steps, backward))
    forward = phases(name, backward)[0]
    for m in range(steps * micro):
        for k in range(1, stages):
            assert where[(k, m, forward)] > where[(k - 1, m, forward)], f"microbatch {m} at stage {k}"


@cases(lambda name, backward: BACKWARD in phases(name, backward))
def test_backward_runs_in_reverse_stage_order_after_forward(name, stages, micro, steps, backward):
    where = clock_of(table_for(name, stages, micro, steps, backward))
    for m in range(steps * micro):
        for k in range(stages):
            assert where[(k, m, BACKWARD)] > where[(k, m, FORWARD)], f"microbatch {m} at stage {k}"
            # the last stage's backward needs every forward of m done, not only its own
            assert where[(k, m, BACKWARD)] > where[(stages - 1, m, FORWARD)]
            if k + 1 < stages:
                assert where[(k, m, BACKWARD)] > where[(k + 1, m, BACKWARD)], f"microbatch {m} at stage {k}"


# -- steps and updates -----------------------------------------------------------------------

@grid
def test_synchronous_schedules_flush_between_steps(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    step_clocks = [[] for _ in range(steps)]
    for c, clock in enumerate(table.clocks):
        for task in clock:
            if task is not None:
                step_clocks[task.microbatch // micro].append(c)
    overlaps = any(max(a) >= min(b) for a, b in zip(step_clocks, step_clocks[1:]))
    if SCHEDULES[name].synchronous:
        assert not overlaps
    else:
        # streaming never waits for a flush, so steps overlap whenever there is a pipeline to fill
        assert overlaps == (stages > 1 and steps > 1)


@grid
def test_one_update_per_stage_per_step_on_its_last_task(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    for k in range(stages):
        for step in range(steps):
            mine = [(c, clock[k]) for c, clock in enumerate(table.clocks)
                    if clock[k] is not None and clock[k].microbatch // micro == step]
            updates = [task for _, task in mine if task.update]
            assert len(updates) == 1, f"stage {k} step {step}: {[t.label() for _, t in mine]}"
            _, last_task = max(mine, key=lambda pair: pair[0])
            assert last_task.update, f"stage {k} step {step} updates before its last task"
            if name == "streaming":
                assert last_task.microbatch == (step + 1) * micro - 1


# -- statistics ------------------------------------------------------------------------------

def idle_fraction(table):
    return Fraction(table.idle, table.slots)


@only("streaming")
def test_streaming_idle_fraction_tends_to_zero(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    total = steps * micro
    assert idle_fraction(table) == Fraction(stages - 1, total + stages - 1)
    assert table.idle_fraction == pytest.approx(float(Fraction(stages - 1, total + stages - 1)))


@only("gpipe")
def test_gpipe_idle_fraction_is_its_bubble(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    assert idle_fraction(table) == Fraction(stages - 1, micro + stages - 1)


@only("sequential")
def test_sequential_keeps_one_stage_busy(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    assert all(sum(task is not None for task in clock) == 1 for clock in table.clocks)
    assert idle_fraction(table) == Fraction(stages - 1, stages)


def test_busy_idle_and_slots_add_up():
    table = GPipe(4).table(3, 2)
    assert table.busy == len(table.tasks()) == 2 * 2 * 4 * 3
    assert table.busy + table.idle == table.slots == len(table.clocks) * 3
    assert TaskTable((), 3).idle_fraction == 0.0


# -- streaming timing and incremental planning -----------------------------------------------

@only("streaming")
def test_streaming_stage_k_runs_microbatch_c_minus_k(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    total = steps * micro
    assert len(table.clocks) == total + stages - 1
    for c, clock in enumerate(table.clocks):
        for k, task in enumerate(clock):
            if 0 <= c - k < total:
                assert (task.microbatch, task.phase) == (c - k, LOCAL), f"clock {c} stage {k}"
            else:
                assert task is None, f"clock {c} stage {k}"


def progress(clocks, stages):
    """Microbatches each stage has taken in (its forward or local task has run)."""
    done = [0] * stages
    for clock in clocks:
        for task in clock:
            if task is not None and task.phase != BACKWARD:
                done[task.stage] = max(done[task.stage], task.microbatch + 1)
    return done


def fed_step_by_step(schedule, stages, steps, backward):
    """Clocks as the executor gets them: one plan per fed step without draining, then a drain."""
    clocks = []
    for step in range(steps):
        fed = (step + 1) * schedule.microbatches
        clocks += schedule.plan(stages, progress(clocks, stages), fed, drain=False, backward=backward)
    clocks += schedule.plan(stages, progress(clocks, stages), steps * schedule.microbatches,
                            drain=True, backward=backward)
    return TaskTable(tuple(clocks), stages)


@grid
def test_feeding_step_by_step_gives_the_whole_run_table(name, stages, micro, steps, backward):
    schedule = SCHEDULES[name](micro)
    assert fed_step_by_step(schedule, stages, steps, backward) == table_for(name, stages, micro, steps, backward)


@only("streaming")
def test_streaming_incremental_plan_equals_one_plan(name, stages, micro, steps, backward):
    schedule = Streaming(micro)
    whole = schedule.plan(stages, [0] * stages, steps * micro, drain=True, backward=backward)
    assert table_for(name, stages, micro, steps, backward) == TaskTable(tuple(whole), stages)


def test_streaming_without_drain_leaves_the_pipeline_full():
    clocks = Streaming(2).plan(3, [0, 0, 0], 4, drain=False, backward=False)
    assert progress(clocks, 3) == [4, 3, 2]
    assert Streaming(2).plan(3, [4, 3, 2], 4, drain=False, backward=False) == []


@pytest.mark.parametrize("schedule", [Sequential(2), GPipe(2)], ids=repr)
def test_synchronous_plan_refuses_a_partial_step(schedule):
    with pytest.raises(lpjax.ConfigError):
        schedule.plan(3, [0, 0, 0], 3, drain=False, backward=True)
    assert schedule.plan(3, [2, 2, 2], 2, drain=True, backward=True) == []


# -- printing --------------------------------------------------------------------------------

@grid
def test_diagram_shows_every_slot(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    lines = table.diagram(max_clocks=len(table.clocks)).splitlines()
    assert len(lines) == stages + 1
    for k in range(stages):
        prefix = f"stage {k}:"
        assert lines[k].startswith(prefix)
        cells = lines[k][len(prefix):].split()
        assert cells == [clock[k].label() if clock[k] else "." for clock in table.clocks]
    assert len({len(line) for line in lines[:-1]}) == 1, "stage rows are not aligned"
    assert lines[-1].startswith(f"{len(table.clocks)} clocks")
    assert f"idle fraction {table.idle_fraction:.4f}" in lines[-1]


def test_diagram_labels():
    assert "B3*" in Sequential(4).table(2, backward=True).diagram()
    assert "F0 " in Sequential(4).table(2, backward=True).diagram().splitlines()[0] + " "
    assert "F3*" in GPipe(4).table(2, backward=False).diagram()
    streaming = Streaming(2).table(3, 3).diagram()
    assert "L5*" in streaming and "L4 " in streaming and "L4*" not in streaming


def test_diagram_truncates_long_tables():
    table = Streaming(8).table(4, 10)
    lines = table.diagram(max_clocks=5).splitlines()
    assert len(lines) == 5
    assert all(line.endswith(" ...") and len(line.split()) == 2 + 5 + 1 for line in lines[:-1])
    assert lines[-1].startswith(f"{len(table.clocks)} clocks")
    assert str(table) == table.diagram()


# -- construction ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEDULES))
def test_make_schedule_by_name(name):
    schedule = make_schedule(name, 4)
    assert type(schedule) is SCHEDULES[name] and schedule.microbatches == 4
    assert make_schedule(name).microbatches == 1


@pytest.mark.parametrize("name", ["pipedream", "GPipe", ""])
def test_make_schedule_rejects_unknown_names(name):
    with pytest.raises(lpjax.ConfigError, match="unknown schedule"):
        make_schedule(name)


@pytest.mark.parametrize("micro", [0, -1, 1.5, "2", None])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_make_schedule_rejects_bad_microbatches(name, micro):
    with pytest.raises(lpjax.ConfigError, match="microbatches"):
        make_schedule(name, micro)
