"""Checks of the batches the Python API is given: ``Trainer.step``, ``evaluate``, ``evaluate_batches``,
``predict`` and ``lpjax.fit``. A bad batch raises one ``ConfigError`` naming the problem and the fix
before anything is placed on a device, so nothing trains on it.

=====================================  =====================================================================
input                                  outcome
=====================================  =====================================================================
labels outside ``[0, num_classes)``    ``ConfigError`` naming the label and the range (numpy, on the host)
  ... as ``jax.Array`` to ``step``     counted inside the step program, whose update is then skipped
                                       like a non-finite one; ``ConfigError`` at the next train record
                                       (``lpjax.fit``), and ``step``'s metrics carry ``bad_labels``
  ... as ``jax.Array`` to ``evaluate`` ``ConfigError`` (evaluation reads its figures per batch anyway)
float or other non-integer labels      ``ConfigError``: labels must be integers
non-numeric inputs (strings, objects)  ``ConfigError``
an empty batch (0 rows)                ``ConfigError``
ragged inputs or labels                ``ConfigError``: rows of different shapes
inputs and labels of different length  ``ConfigError``
NaN or infinite inputs                 trained as a non-finite loss is: the update is skipped and counted
                                       (``health()``; ``nonfinite=halt`` stops at the next record);
                                       ``evaluate`` reports a NaN loss
=====================================  =====================================================================

``num_classes`` is the trainer's when given, else the last head's output width (the logits' last
dimension); for a language model it is the vocabulary. Host checks cost a pass over the labels,
small next to copying the batch to the device. The array checks themselves live in lpjax/data/checks.py,
which the data sources share.
"""

import jax
import numpy as np

from lpjax.data.checks import check_labels, examples, inputs
from lpjax.errors import ConfigError


class BatchChecks:
    """The checks of one trainer's batches. Each new input and label shape is checked against the
    model once (``Trainer.check_shapes``), which also tells the number of classes."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.num_classes = trainer.num_classes
        self._checked = set()  # (input shape, label shape) per row, already checked against the model

    def training(self, x, y):
        """``(x, y)`` as arrays, for ``Trainer.step``; device labels are left to the step program."""
        x, y = examples(x, y, "Trainer.step")
        self._against_model(x, y)
        if not isinstance(y, jax.Array):
            check_labels(y, self.num_classes, "Trainer.step")
        return x, y

    def evaluation(self, x, y, where="evaluation"):
        """``(x, y)`` as arrays, for evaluation; device labels are read back to be checked."""
        x, y = examples(x, y, where)
        self._against_model(x, y)
        if not isinstance(y, jax.Array) or y.is_fully_addressable:
            check_labels(np.asarray(jax.device_get(y)), self.num_classes, where)
        return x, y

    def data_source(self, data):
        """For ``lpjax.fit``, before anything is written: every split of an in-memory data source
        (``lpjax.data.Dataset``) at once; a streaming source's batches are checked as they come."""
        for split in ("train", "test"):
            x, y = getattr(data, f"{split}_x", None), getattr(data, f"{split}_y", None)
            if x is not None and y is not None:
                self.evaluation(x, y, f"the data's {split} split")

    def prediction(self, x):
        """``x`` as an array, for ``Trainer.predict``: numeric rows every stage can take."""
        x = inputs(x, "predict")
        key = (np.shape(x)[1:], None)
        if key not in self._checked:
            try:
                _last_head_width(self.trainer.rules, x)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"predict: the model cannot take inputs of shape {np.shape(x)}: "
                                  f"{str(err).splitlines()[0]}") from None
            self._checked.add(key)
        return x

    def each(self, batches, where="evaluation"):
        """``evaluation`` of every batch of an iterable, lazily."""
        for x, y in batches:
            yield self.evaluation(x, y, where)

    def _against_model(self, x, y):
        key = (np.shape(x)[1:], np.shape(y)[1:])
        if key in self._checked:
            return
        self.trainer.check_shapes(x, y)
        if self.trainer.num_classes is None:
            self.num_classes = _last_head_width(self.trainer.rules, x)
        self._checked.add(key)


def raise_on_bad_labels(step_metrics, step: int, num_classes) -> None:
    """At a sync point: ``ConfigError`` if any step's metrics (host values, ``Trainer.step``'s lists
    of per-stage dicts) counted out-of-range device labels. Those steps' updates were skipped."""
    for stages in step_metrics:
        for metrics in stages or ():
            if metrics is not None and metrics.get("bad_labels", 0) > 0:
                raise ConfigError(f"labels outside [0, {num_classes}) reached Trainer.step as device arrays by step "
                                  f"{step}; the updates they were in were skipped. Labels must be integers "
                                  f"0 <= y < {num_classes}: fix them before they are placed")


def _last_head_width(rules, x) -> int:
    h = jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    for rule in rules:
        h, logits = jax.eval_shape(rule.predict, jax.eval_shape(rule.init_state), h)
    return logits.shape[-1]
