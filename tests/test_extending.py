"""docs/extending.md runs as written: every Python block, in order, in one namespace, from an empty
directory; blocks that start with ``# file: NAME`` are written to that file instead."""

import re
import sys
from pathlib import Path

from lpjax.core.methods import METHODS

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def test_every_example_in_the_extending_guide_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {"__name__": "extending_guide"}
    try:
        for block in blocks:
            first = block.splitlines()[0]
            if first.startswith("# file: "):
                (tmp_path / first[len("# file: "):].strip()).write_text(block)
            else:
                exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        for name in ("my_blocks", "my_recipe"):
            sys.modules.pop(name, None)
        METHODS.pop("two-back", None)  # section 4's method, registered by the guide
    out = capsys.readouterr().out
    assert "test accuracy per stage:" in out and "greedy with MLP heads:" in out
    # the recipe with a user builder trained through the CLI's loop, and fit wrote its workdir
    assert namespace["recipe_results"]["model"] == "my_blocks4x64"
    assert namespace["results"]["final"]["test_accuracy"] > 0.5
    for run in ("runs/my_blocks", "runs/my_blocks_fit"):
        assert (tmp_path / run / "results.json").is_file() and (tmp_path / run / "checkpoints").is_dir()
    assert len(namespace["logits"]) == 2
    # section 4: the user's method, with private heads and with the shared readout
    assert "two-back [" in out and "two-back + shared readout (refreshed every 10 steps) [" in out
    assert namespace["trainer"].method.shared.refresh_steps == 10
