"""The human-readable parts of a run: a one-line summary before training and the per-stage table after."""


def describe(experiment) -> str:
    cfg, data, trainer = experiment.config, experiment.dataset, experiment.trainer
    layout = cfg["layout"]
    where = ("reference executor, one device" if layout["executor"] == "reference"
             else f"{layout['executor']} executor on {layout['stages']}x{layout['data']} devices")
    return (f"{experiment.network.name} ({len(experiment.network.layers)} layers) on {data.name} "
            f"({data.num_train} train / {data.num_test} test) | {trainer.method.name}, {trainer.num_stages} stages, "
            f"{cfg['schedule']['name']} schedule x{trainer.microbatches} microbatches, {where} | "
            f"{experiment.num_steps} steps of batch {cfg['batch_size']}"
            + (f" | {experiment.split.describe()}" if getattr(experiment, "split", None) is not None else ""))


def _layers(span) -> str:
    first, last = span
    return str(first) if first == last else f"{first}-{last}"


def _number(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def stage_table(stages: list) -> str:
    """``stages``: the per-stage dicts of results.json."""
    header = f"{'stage':>5}  {'layers':>6}  {'train loss':>10}  {'test loss':>9}  {'test acc':>8}"
    lines = [header, "-" * len(header)]
    for row in stages:
        acc = None if row["test_accuracy"] is None else 100 * row["test_accuracy"]
        mark = "" if row["head_trained"] else "  (head not trained by this method)"
        lines.append(f"{row['stage']:>5}  {_layers(row['layers']):>6}  {_number(row['train_loss'], '.4f'):>10}  "
                     f"{_number(row['test_loss'], '.4f'):>9}  {_number(acc, '.2f'):>7}%{mark}")
    return "\n".join(lines)
