"""What the training loop does about skipped updates (``nonfinite``: halt or skip).

A stage skips an update whose loss or gradient is not finite, and counts it (``StageRule.update``).
Under ``skip`` it also checks every value an update would write, and skips (and counts) one that
would overflow, so the state stays finite; under ``halt`` that check is left out of the step (it
costs one more computation of the optax step per update) and an overflowing update is written. At
each train record, the loop's one sync, the guard reads the counts and each stage's ``finite``:

- a stage whose state is not finite stops the run under either policy, naming the checkpoint to
  resume from (no checkpoint ever holds it: ``Checkpointer.save`` refuses non-finite state);
- ``halt`` stops the run at the first skipped update, naming the checkpoint to resume from.
- ``skip`` carries on past bad batches, but not past a dead model: a stage that skipped every update
  of the last ``STALLED_STEPS`` steps no longer trains (its loss, gradient or update is not finite on
  any batch, as after a learning rate that overflows the first update), and the run stops with
  ``NonFiniteError`` (exit status 1) instead of finishing with it. Ten steps because a few bad
  batches in a row happen with dirty data, while ten in a row mean no batch gets through; the
  figures are read where the loop syncs anyway, so the stop comes at the first record after them.
"""

import math

from lpjax.errors import NonFiniteError

STALLED_STEPS = 10


class NonfiniteGuard:
    """Applies the policy to each train record; holds the skip counts of the previous record.

    Args:
      policy: "halt" or "skip".
      skipped: each stage's skipped updates when the loop starts (a resumed run's counts).
      start_step: the step the loop starts after.
      lags: per stage, how many of its updates a streaming schedule may still owe at a record that
        did not drain the pipeline (0 for flushing schedules, which update every stage every step).
    """

    def __init__(self, policy: str, skipped, start_step: int, lags):
        self.policy, self.lags = policy, list(lags)
        self.skipped = [int(n) for n in skipped]
        self.last = start_step
        self.stalled_since = [start_step] * len(self.lags)  # where each stage's run of skipped updates began

    def check(self, stages, step: int, saved=None) -> None:
        """Raise ``NonFiniteError`` as the policy says, for the record ``stages`` at ``step``.

        ``saved``: the step of the newest checkpoint, None when there is none yet."""
        broken = [k for k, record in enumerate(stages) if not record.get("finite", True)]
        if broken:  # halt writes updates unchecked: one that overflowed shows here, under either policy
            raise NonFiniteError(_overflow_message(broken[0], step, saved))
        if self.policy == "halt":
            halt_on_skipped(stages, step, saved)
        window = step - self.last
        for k, record in enumerate(stages):
            delta = record["skipped"] - self.skipped[k]
            if not (window > 0 and delta >= max(1, window - self.lags[k])):
                self.stalled_since[k] = step
            self.skipped[k] = record["skipped"]
        self.last = step
        stalled = [k for k in range(len(stages)) if step - self.stalled_since[k] >= STALLED_STEPS]
        if stalled:
            raise NonFiniteError(_stalled_message(stalled[0], self.stalled_since[stalled[0]], step, saved))


def halt_on_skipped(stages, step, saved=None) -> None:
    """``nonfinite=halt``: stop at the first record that counts a skipped update."""
    bad = [(k, s["skipped"]) for k, s in enumerate(stages) if s["skipped"]]
    if bad:
        where = ", ".join(f"stage {k} ({n} update{'s' if n > 1 else ''})" for k, n in bad)
        kept = (f"the checkpoint at step {saved} holds finite values" if saved
                else "no checkpoint was written yet")
        raise NonFiniteError(f"non-finite loss or gradient by step {step}: skipped {where}; {kept}. Lower the "
                             f"learning rate or check the data, or set --config.nonfinite=skip to carry on past "
                             f"bad batches")


def _overflow_message(k, step, saved) -> str:
    kept = f"the checkpoint at step {saved} holds finite values" if saved else "no checkpoint was written yet"
    return (f"stage {k}'s parameters or optimizer state are not finite at step {step}: an update overflowed (a "
            f"learning rate times a gradient past float32's range); {kept}. Lower the learning rate, or set "
            f"--config.nonfinite=skip, which checks every update before writing it and skips those that overflow")


def _stalled_message(k, since, step, saved) -> str:
    if not saved:
        kept = "no checkpoint was written yet"
    elif saved <= since:
        kept = f"the newest checkpoint, at step {saved}, was written before these steps"
    else:
        kept = f"the newest checkpoint, at step {saved}, already holds the stalled stage"
    return (f"stage {k} skipped every update of steps {since + 1}-{step}: its loss, gradient or update is not "
            f"finite on any batch, so it no longer trains ({kept}). Lower the learning rate (or check the data) "
            f"and train again in a new --workdir")


def streaming_lags(num_stages: int, microbatches: int, synchronous: bool) -> list:
    """Per stage, the updates a streaming schedule owes at a record that did not drain: stage k runs
    ``k`` microbatches behind stage 0, so it has finished ``ceil(k / microbatches)`` steps fewer."""
    if synchronous:
        return [0] * num_stages
    return [math.ceil(k / microbatches) for k in range(num_stages)]
