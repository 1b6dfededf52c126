"""The figures: every file exists as PNG and SVG, every (method, batch size) run is in a legend, and
the axes are labelled the way a paper needs, all read back from the SVG text."""

import json
import os
import re

import numpy as np
import pytest

from lpjax.research import analysis, plots

METHODS = ("backprop", "greedy", "overlapping")
BATCHES = (16, 64, 256)


def svg_text(path) -> str:
    with open(path, encoding="utf-8") as f:
        svg = f.read()
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg))


@pytest.fixture(scope="module")
def sweep():
    """Synthetic sweep records shaped like lpjax.research.sweep's: a loss curve with cost columns per run."""
    runs = []
    for m, method in enumerate(METHODS):
        for batch in BATCHES:
            steps = np.arange(1, 41)
            loss = 2.5 * np.exp(-steps * (0.05 + 0.02 * m) * np.sqrt(batch / 16)) + 0.2
            runs.append({"problem": "toy", "label": method, "method": method, "batch_size": batch,
                         "learning_rate": 1e-2, "run_id": f"{method}_{batch}", "steps": steps.tolist(),
                         "loss": loss.tolist(), "compute": (steps * batch * 1e6 * (1 + m)).tolist(),
                         "ideal_time": (steps * 1e6 / (1 + m)).tolist(), "wall_time": (steps * 0.1).tolist(),
                         "target_loss": 1.0})
    best = analysis.best_runs(runs, target=1.0, window=1)
    return runs, best


def test_every_sweep_figure_is_png_and_svg_with_a_title_and_each_method_and_batch(sweep, tmp_path):
    runs, best = sweep
    title = "lpjax bench toy-suite"
    written = plots.pareto_figure(best, tmp_path, title=title)
    for x in ("compute", "ideal_time", "wall_time"):
        written += plots.loss_curves_figure(runs, best, tmp_path, x=x, window=1, title=title)
    written += plots.steps_to_target_figure(best, tmp_path, title=title)
    rows = [{"problem": "toy", "label": m, "batch_size": 256, "alignment": [0.2, 0.5, 1.0]} for m in METHODS[1:]]
    written += plots.alignment_figure(rows, tmp_path, title=title)
    names = {os.path.basename(p) for p in written}
    for stem in ("pareto", "loss_vs_compute", "loss_vs_ideal_time", "loss_vs_wall_time", "steps_vs_batch", "alignment"):
        for ext in ("png", "svg"):
            assert f"{stem}.{ext}" in names
            assert os.path.getsize(tmp_path / f"{stem}.{ext}") > 1000
        assert title in svg_text(tmp_path / f"{stem}.svg")

    for x in ("compute", "ideal_time", "wall_time"):
        text = svg_text(tmp_path / f"loss_vs_{x}.svg")
        for method in METHODS:
            for batch in BATCHES:
                assert f"{method}, batch {batch}" in text, (x, method, batch)
    pareto = svg_text(tmp_path / "pareto.svg")
    assert all(method in pareto for method in METHODS)
    assert all(str(batch) in pareto.split() for batch in BATCHES)  # each point labelled with its batch size

    # log axes carry several numbers, not one or two powers of ten
    ticks = [t for t in svg_text(tmp_path / "loss_vs_compute.svg").split() if re.fullmatch(r"[0-9.]+(e-?[0-9]+)?", t)]
    assert len(ticks) >= 6, ticks

    # stages numbered from 0 at the input side
    alignment = svg_text(tmp_path / "alignment.svg")
    assert "stage k (0 = input side)" in alignment and "greedy (3 stages), batch 256" in alignment
    words = alignment.split()
    assert {"0", "1", "2"} <= set(words) and not {"−1", "−2", "-1", "-2"} & set(words)


def test_run_curves_are_png_and_svg_with_the_run_in_the_title(tmp_path):
    records = [{"step": s, "time": s, "split": "train", "loss": [2.0 / s, 1.5 / s], "accuracy": [0.1 * s, 0.12 * s]}
               for s in range(1, 6)]
    records.append({"step": 5, "time": 5, "split": "test", "loss": [0.5, 0.4], "accuracy": [0.5, 0.6]})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "method": {"name": "greedy"}, "stages": 2,
              "batch_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    paths = plots.plot_run(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["curves.png", "curves.svg"]
    text = svg_text(tmp_path / "curves.svg")
    assert f"{tmp_path.name}: mlp on digits, greedy, 2 stages, batch 32" in text
    assert "stage 0" in text and "stage 1" in text
