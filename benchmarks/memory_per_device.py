"""Memory per device: backprop on one device against the largest stage of a local method (issues 13, 27).

Peak bytes from XLA's memory analysis of the compiled programs (arguments + outputs + temporaries -
aliased, the state donated as the executors donate it), with abstract inputs: nothing is trained and
no data is needed. Backprop compiles its whole step as one program (forward, backward, update); the
local method (chunked by default) cuts the network into K memory-balanced stages
(split_points="balanced_memory", measured with the same accounting, lpjax.research.balance) and
compiles each stage's training step and update; the table shows the largest stage, and the even
cut's beside it. Per stage, the peak is the larger of the training step and the optimizer update.
Below the table, where the bytes go at K = 4: parameters, head, optimizer state and gradient sum,
input batch, outputs and XLA's temporaries (the activations kept for the stage's own backward pass),
for backprop and every stage (lpjax.research.memory).

Cases, as in recipes/sweeps/paper.py: ResNet-32 at CIFAR shape (32x32x3), batch 128, and an 8-block
byte Transformer LM (width 256) at sequence length 256, batch 32. Goal at K = 4: the largest stage
at most 0.3x backprop's peak (InfoPro reports -62.6 % at K = 4).

Run from the repository root (several minutes on 2 CPU cores, most of it compiling):

    python benchmarks/memory_per_device.py
    python benchmarks/memory_per_device.py --case resnet32_cifar --stages 2 4
    python benchmarks/memory_per_device.py --tiny   # a 4-layer MLP, seconds
    python benchmarks/memory_per_device.py --case resnet32_cifar --stages 4 --exact-cut --remat none
        # also compiles every possible stage (136 for ResNet-32; about 4 min) and prints the exact
        # min-max cut over them, which shows whether any cut between layers beats the balanced one

It prints a markdown table and, with --json PATH, writes the rows.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = {"tiny_mlp": {"model": "mlp", "input_shape": (8, 8, 1), "num_classes": 10, "depth": 4, "width": 32,
                     "batch": 16}}


def main(argv=None) -> int:
    from lpjax.research.bench import suite_path
    from lpjax.research.memory import memory_lines, memory_table, memory_verdict
    from lpjax.research.sweep import load_config_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="K values (default 2 4 8)")
    parser.add_argument("--case", action="append", help="only this case of the paper suite (repeatable)")
    parser.add_argument("--method", default="chunked", help="local method of the stages (chunked, greedy, overlapping)")
    parser.add_argument("--tiny", action="store_true", help="a tiny MLP instead of the paper suite's cases")
    parser.add_argument("--remat", default=None, help="K = 4 again with this remat policy on both sides "
                        "(default: the paper suite's; none to skip)")
    parser.add_argument("--exact-cut", action="store_true", help="also compile every contiguous run of layers "
                        "as a stage and print the exact min-max partition at each K (slow)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    memory = load_config_file(suite_path("paper")).to_dict()["memory"]
    models = TINY if args.tiny else memory["models"]
    if args.case:
        unknown = sorted(set(args.case) - set(models))
        if unknown:
            print(f"memory_per_device: error: unknown case {unknown[0]!r}; choose from {', '.join(models)}",
                  file=sys.stderr)
            return 2
        models = {name: models[name] for name in args.case}
    stages = tuple(args.stages or memory["stages"])
    remat = args.remat or memory.get("remat", "none")
    rows = memory_table({"stages": stages, "models": models, "remat": remat if 4 in stages else "none"},
                        method=args.method)
    print("\n".join(memory_lines(rows)))
    verdict = memory_verdict(rows)
    if 4 in stages:
        print(f"K = 4, largest local stage / backprop: "
              + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in verdict["ratios_k4"].items() if ratio is not None)
              + f" (goal <= {verdict['goal']}; {verdict['paper']})")
        for name, r in verdict["remat_k4"].items():  # beside the verdict: the paper's backprop does not recompute
            print(f"K = 4 with remat {r['policy']}, {name}: largest stage / backprop without remat "
                  f"{r['vs_plain']:.2f}x, / backprop with it {r['vs_remat']:.2f}x")
    if args.exact_cut:
        for name, spec in models.items():
            exact_cut(name, spec, stages)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


def exact_cut(name, spec, stages):
    """The partition minimising the largest stage's measured peak over EVERY cut between layers: each
    contiguous run of layers compiled once as a stage (memoised), then dynamic programming. The
    suite's balanced cut is a descent from two candidates; this checks it against all of them."""
    from lpjax.research.balance import measured_stage_memory, min_max_partition
    from lpjax.research.memory import case_network, example_shapes

    x, y = example_shapes(spec)
    network = case_network(spec)
    cost = measured_stage_memory(network, x, y)
    found = {}
    for k in stages:
        points, costs = min_max_partition(len(network.layers), k, cost)
        found[k] = (points, costs)
        sizes = ", ".join(f"{c / 2 ** 20:.1f}" for c in costs)
        print(f"exact cut, {name}, K = {k}: {points}, stages {sizes}"
              + f" MiB; largest {max(costs) / 2 ** 20:.1f} MiB (every run of the {len(network.layers)} layers compiled)")
    return found


if __name__ == "__main__":
    sys.exit(main())
