"""optax transformations from the ``optimizer`` section of a config: one for all stages or one per stage.

Fields: ``name`` (sgd | momentum | adam | adamw), ``learning_rate``, optional ``learning_rates`` (one
per stage; overrides ``learning_rate``), ``weight_decay`` (decoupled for adamw, an L2 term added to
the gradient for the others), ``momentum`` (momentum only), ``decay`` (constant | cosine) with
``warmup_steps`` of linear warmup, and optional ``grad_clip_norm``.
"""

import optax

from lpjax.config.checks import fraction_below_one, non_negative_int, non_negative_number, number_list, one_of, positive_number
from lpjax.errors import ConfigError
from lpjax.core.methods import ONE_TREE

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
DECAYS = ("constant", "cosine")


def check_optimizer_config(opt, num_stages: int, method) -> None:
    """Validates the ``optimizer`` section (a ConfigDict) for a ``method`` over ``num_stages`` stages:
    everything that does not need the step count. Returns None; raises ConfigError naming the key."""
    one_of(opt.name, OPTIMIZERS, "optimizer.name")
    one_of(opt.decay, DECAYS, "optimizer.decay")
    positive_number(opt.learning_rate, "optimizer.learning_rate")
    non_negative_number(opt.weight_decay, "optimizer.weight_decay")
    fraction_below_one(opt.momentum, "optimizer.momentum")
    non_negative_int(opt.warmup_steps, "optimizer.warmup_steps")
    if opt.grad_clip_norm is not None:
        positive_number(opt.grad_clip_norm, "optimizer.grad_clip_norm")
    rates = number_list(opt.learning_rates, "optimizer.learning_rates")
    if rates is None:
        return
    if method.optimizer == ONE_TREE:
        raise ConfigError("backprop trains the whole model with one optimizer; drop optimizer.learning_rates "
                          "or pick a local method")
    if len(rates) != num_stages:
        raise ConfigError(f"optimizer.learning_rates has {len(rates)} entries for {num_stages} stages; "
                          f"give exactly one learning rate per stage")
    for k, rate in enumerate(rates):
        positive_number(rate, f"optimizer.learning_rates[{k}]")


def build_optimizers(opt, num_stages: int, num_steps: int, method):
    """The optax transformation(s) of the ``optimizer`` section.

    Args:
      opt: the ``optimizer`` section (a ConfigDict), checked with ``check_optimizer_config``.
      num_stages: K.
      num_steps: the run's optimizer steps, over which a cosine decay runs.
      method: the ``Method`` (per-stage rates are refused for a ONE_TREE method).

    Returns:
      One ``optax.GradientTransformation`` for all stages, or a list of K when ``learning_rates``
      gives one rate per stage; the form ``lpjax.Trainer`` takes as ``optimizer``.
    """
    check_optimizer_config(opt, num_stages, method)
    rates = number_list(opt.learning_rates, "optimizer.learning_rates")
    if rates is None:
        return _transformation(opt, opt.learning_rate, num_steps)
    return [_transformation(opt, rate, num_steps) for rate in rates]


def learning_rate_schedules(opt, num_stages: int, num_steps: int) -> list:
    """Per stage, the learning rate as a function of the update count (what the logs report): K
    callables ``count -> float``, matching what ``build_optimizers`` applies."""
    rates = number_list(opt.learning_rates, "optimizer.learning_rates") or [opt.learning_rate] * num_stages
    schedules = []
    for rate in rates:
        schedule = _learning_rate(opt, rate, num_steps)
        schedules.append(schedule if callable(schedule) else (lambda count, value=float(schedule): value))
    return schedules


def _learning_rate(opt, peak: float, num_steps: int):
    warmup = min(opt.warmup_steps, num_steps)
    if opt.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1))
    if warmup == 0:
        return peak
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def _transformation(opt, peak: float, num_steps: int) -> optax.GradientTransformation:
    lr = _learning_rate(opt, peak, num_steps)
    if opt.name == "adamw":
        core = optax.adamw(lr, weight_decay=opt.weight_decay)
    else:
        core = {"sgd": lambda: optax.sgd(lr),
                "momentum": lambda: optax.sgd(lr, momentum=opt.momentum),
                "adam": lambda: optax.adam(lr)}[opt.name]()
        if opt.weight_decay:
            core = optax.chain(optax.add_decayed_weights(opt.weight_decay), core)
    if opt.grad_clip_norm is not None:
        core = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
    return core
