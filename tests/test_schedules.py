"""Properties of the schedules' task tables (docs/semantics.md), checked without running anything.

Every table is checked over a grid of stage counts, microbatches per step, steps and with or without
a backward phase, so a schedule change that breaks an ordering or a statistic for one shape shows up.
"""

import functools
import itertools
from fractions import Fraction

import pytest

import lpjax
from lpjax.core.schedules import (BACKWARD, DELAY_PER_HOP, FORWARD, LOCAL, Flow, GPipe, OneFOneB, Phase, Sequential,
                                  Streaming, TaskTable, make_schedule)

SCHEDULES = {"sequential": Sequential, "gpipe": GPipe, "1f1b": OneFOneB, "streaming": Streaming}
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


def phases(name, backward, stages=2):
    """The phases each microbatch goes through at every stage (one stage has nothing to send back)."""
    if name == "streaming":
        return (LOCAL,)  # forward and the delayed backward are one task; `backward` changes nothing
    return (FORWARD, BACKWARD) if backward and stages > 1 else (FORWARD,)


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
                for phase in phases(name, backward, stages)}
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
    if stages == 1:
        return  # one stage: no cotangent to send, no backward task
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


# -- what tasks consume ----------------------------------------------------------------------

FLOWS = {  # Method.sources per stage for some methods on 4 stages
    "backprop": Flow(((3,), (3,), (3,), ())),
    "window1": Flow(((), (), (), ())),
    "window2": Flow(((1,), (2,), (3,), ())),
    "window3-uneven": Flow(((2,), (2, 3), (3,), ())),  # loss 1 switched off
}


def consumption_cases():
    chosen = [(name, flow, micro, steps, drains) for name in SCHEDULES for flow in FLOWS
              for micro in (1, 2, 3) for steps in (1, 3) for drains in (False, True)
              if not (name == "streaming" and flow == "backprop")]
    return pytest.mark.parametrize("name,flow,micro,steps,drains", chosen,
                                   ids=[f"{n}-{f}-M{m}-steps{s}-{'drains' if d else 'stream'}" for n, f, m, s, d in chosen])


def producer(task, j, about):
    """The (stage, microbatch, phase-kind) of the task that sends loss j's cotangent about ``about``
    to stage ``task.stage``: the sender's own forward if ``j`` is the next stage, else the sender's
    task that consumed it."""
    return task.stage + 1, j, about


@consumption_cases()
def test_every_consumed_cotangent_was_sent_at_an_earlier_clock(name, flow, micro, steps, drains):
    flow_ = FLOWS[flow]
    table = SCHEDULES[name](micro).table(4, steps, flow=flow_, drain_every_step=drains)
    sent, consumed = {}, set()
    for c, clock in enumerate(table.clocks):
        for task in clock:
            if task is None:
                continue
            k = task.stage
            for j, about in task.consumes:
                assert j in flow_.sources[k]
                assert sent.get((k, j, about), c) < c, f"{task.label()} at stage {k} consumes ({j}, {about}) unsent"
                assert (k, j, about) not in consumed, "consumed twice"
                consumed.add((k, j, about))
        for task in clock:  # messages are sent at the end of the clock
            if task is None or task.stage == 0:
                continue
            k = task.stage
            if task.runs_forward and k in flow_.sources[k - 1]:
                sent[(k - 1, k, task.microbatch)] = c
            for j, about in task.consumes:
                if j in flow_.sources[k - 1]:
                    sent[(k - 1, j, about)] = c
    total = steps * micro
    if SCHEDULES[name].synchronous:  # every message is consumed, about the backward's own microbatch
        assert consumed == set(sent)
        for task in table.tasks():
            expected = tuple((j, task.microbatch) for j in flow_.sources[task.stage]) if task.phase == BACKWARD else ()
            assert task.consumes == expected
    else:  # streaming: about m - 2d, where it exists
        for task in table.tasks():
            k, m = task.stage, task.microbatch
            assert task.consumes == tuple((j, m - DELAY_PER_HOP * (j - k)) for j in flow_.sources[k]
                                          if m - DELAY_PER_HOP * (j - k) >= 0)
        assert all(about + DELAY_PER_HOP * (j - k) >= total for k, j, about in set(sent) - consumed)


@grid
def test_first_task_of_each_step_is_its_first_forward(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    for k in range(stages):
        mine = [clock[k] for clock in table.clocks if clock[k] is not None]
        firsts = [task for task in mine if task.first]
        assert [t.microbatch for t in firsts] == [s * micro for s in range(steps)]
        assert all(t.runs_forward for t in firsts)
        for step in range(steps):
            in_step = [t for t in mine if t.microbatch // micro == step]
            assert in_step[0].first


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


@only("1f1b")
def test_1f1b_idle_fraction_is_gpipes_bubble(name, stages, micro, steps, backward):
    table = table_for(name, stages, micro, steps, backward)
    assert idle_fraction(table) == Fraction(stages - 1, micro + stages - 1)
    assert len(table.clocks) == steps * (2 if backward and stages > 1 else 1) * (micro + stages - 1)


@cases(lambda name, backward: name == "1f1b" and backward)
def test_1f1b_holds_at_most_k_minus_stage_microbatches(name, stages, micro, steps, backward):
    """The point of 1F1B: stage k has at most ``K-k`` forwards whose backward has not run (GPipe: M)."""
    if stages == 1:
        return  # no backward tasks at all
    table = table_for(name, stages, micro, steps, backward)
    for k in range(stages):
        open_, most = 0, 0
        for clock in table.clocks:
            task = clock[k]
            if task is not None:
                open_ += 1 if task.phase == FORWARD else -1
                most = max(most, open_)
        assert most == min(stages - k, micro), f"stage {k}"
        forwards = [clock[k] for clock in table.clocks if clock[k] is not None and clock[k].phase == FORWARD]
        assert len(forwards) == steps * micro


@cases(lambda name, backward: name == "1f1b" and backward)
def test_1f1b_alternates_in_the_steady_state(name, stages, micro, steps, backward):
    """After its ``K-1-k`` warm-up forwards, stage k alternates one forward and one backward."""
    if stages == 1:
        return  # no backward tasks at all
    table = table_for(name, stages, micro, steps, backward)
    for k in range(stages):
        phases_ = [clock[k].phase for clock in table.clocks if clock[k] is not None][:2 * micro]
        warm = min(stages - 1 - k, micro)
        steady = phases_[warm:warm + 2 * (micro - warm)]
        assert phases_[:warm] == [FORWARD] * warm
        assert steady == [FORWARD, BACKWARD] * (micro - warm)


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
        clocks += schedule.plan(Flow.default(stages, backward), progress(clocks, stages), fed, drain=False)
    clocks += schedule.plan(Flow.default(stages, backward), progress(clocks, stages), steps * schedule.microbatches,
                            drain=True)
    return TaskTable(tuple(clocks), stages)


@grid
def test_feeding_step_by_step_gives_the_whole_run_table(name, stages, micro, steps, backward):
    schedule = SCHEDULES[name](micro)
    assert fed_step_by_step(schedule, stages, steps, backward) == table_for(name, stages, micro, steps, backward)


@only("streaming")
def test_streaming_incremental_plan_equals_one_plan(name, stages, micro, steps, backward):
    schedule = Streaming(micro)
    whole = schedule.plan(Flow.default(stages, backward), [0] * stages, steps * micro, drain=True)
    assert table_for(name, stages, micro, steps, backward) == TaskTable(tuple(whole), stages)


def test_streaming_without_drain_leaves_the_pipeline_full():
    flow = Flow.default(3, False)
    clocks = Streaming(2).plan(flow, [0, 0, 0], 4, drain=False)
    assert progress(clocks, 3) == [4, 3, 2]
    assert Streaming(2).plan(flow, [4, 3, 2], 4, drain=False) == []


@pytest.mark.parametrize("schedule", [Sequential(2), GPipe(2), OneFOneB(2)], ids=repr)
def test_synchronous_plan_refuses_a_partial_step(schedule):
    flow = Flow.default(3, True)
    with pytest.raises(lpjax.ConfigError):
        schedule.plan(flow, [0, 0, 0], 3, drain=False)
    assert schedule.plan(flow, [2, 2, 2], 2, drain=True) == []


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


def test_phases_are_an_enum_that_reads_as_its_name():
    assert [str(phase) for phase in Phase] == ["local", "forward", "backward"]
    assert (LOCAL, FORWARD, BACKWARD) == ("local", "forward", "backward") and Phase("backward") is BACKWARD
    tasks = OneFOneB(2).table(2, 1, flow=Flow.default(2, backward=True)).tasks()
    assert {task.phase for task in tasks} == {FORWARD, BACKWARD}
    assert all(type(task.phase) is Phase for task in tasks)
    assert Streaming(2).table(2, 1).tasks()[0].phase is LOCAL


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
