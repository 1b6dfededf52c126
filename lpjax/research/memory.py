"""Memory per device from compiled programs: the paper suite's memory table and its breakdown
(``lpjax bench --suite paper``, benchmarks/memory_per_device.py). Nothing is trained.

One accounting for every figure. A program's peak is XLA's arguments + outputs + temporaries -
aliased, with the stage state donated as the executors donate it (``lpjax.research.costs``):

- backprop, the baseline: the whole network on one device, its step compiled as one program
  (``costs.whole_step_peak``);
- a local method: the largest stage of its cut; a stage's peak is the larger of its training forward
  and its update (``costs.stage_peak``). The cut is memory-balanced (``split_points="balanced_memory"``,
  measured with this same accounting) and the even cut is reported beside it.

The breakdown splits a program's peak into what it holds: parameters, the head (its parameters,
gradient sum and optimizer slots), the optimizer state and gradient sum of the body, other state
(batch statistics, counters), the input batch, the outputs it passes on (the stage's output; for a
window of 2 or more, the VJP residuals kept for later losses) and XLA's temporaries, which hold the
activations kept for the stage's own backward pass. jax's count of those activations (the body's VJP
residuals) is given beside the temporaries: XLA keeps less, since it fuses elementwise work into the
backward pass.

Remat (``memory["remat"]``, K = 4 only): the same accounting with a rematerialisation policy on both
sides (lpjax/core/remat.py; ``layers_nothing_saved`` keeps each layer's input and recomputes one layer at
a time), the cut balanced under it. Two ratios: the largest stage with remat over backprop *without*
(``vs_plain``: what remat buys a local method over the paper's baseline) and over backprop *with* the
same remat (``vs_remat``: like for like). The verdict uses neither: like the paper (arXiv 2012.03837,
and InfoPro's figure), it compares local methods and backprop both without remat.
"""

import inspect

import jax
import numpy as np
import optax
from flax import nnx

from lpjax.research.costs import forward_leaves, peak_bytes, stage_peak, whole_step_sizes

MEMORY_GOAL = 0.3  # largest local stage / backprop single-device peak at K = 4 (issue 13)
PAPER_MEMORY = "InfoPro: -62.6 % at K = 4 (0.37x); SOLO: 7x less activation memory"
PARTS = ("parameters", "head", "optimizer", "gradients", "other_state", "input", "outputs", "temporaries")


def example_shapes(spec: dict):
    """``(x, y)`` ShapeDtypeStructs of a memory case: tokens for an LM (``seq_len``), images otherwise."""
    batch = int(spec["batch"])
    if "seq_len" in spec:
        tokens = jax.ShapeDtypeStruct((batch, int(spec["seq_len"])), np.int32)
        return tokens, tokens
    return (jax.ShapeDtypeStruct((batch, *spec["input_shape"]), np.float32),
            jax.ShapeDtypeStruct((batch,), np.int32))


def builder_options(spec: dict, builder) -> dict:
    """The builder's keywords from a memory case; ``input_shape`` only shapes the example where the
    builder does not take it (the ResNets read in_channels)."""
    accepted = inspect.signature(builder).parameters
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()
            if k not in ("model", "batch") and k in accepted}


def case_network(spec: dict):
    """The unstaged network of a memory case, seeded as every figure of the table is."""
    from lpjax.models import MODELS

    builder = MODELS[spec["model"]]
    return builder(**builder_options(spec, builder), rngs=nnx.Rngs(0))


# -- what a program holds ---------------------------------------------------------------------------
def _bytes(tree) -> int:
    return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def _head_bytes(tree) -> int:
    """Bytes of the leaves under a ``"head"`` key (the head's share of an optimizer state)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for path, leaf in leaves
                   if any(getattr(key, "key", None) == "head" for key in path)))


def state_parts(state) -> dict:
    """A stage state's bytes by part: ``parameters`` (body), ``head`` (parameters, gradient sum and
    optimizer slots), ``optimizer`` and ``gradients`` (the body's), ``other_state`` (the rest)."""
    head = _bytes(state.params["head"]) + _head_bytes(state.grad_sum) + _head_bytes(state.opt_state)
    parts = {"parameters": _bytes(state.params["body"]), "head": head,
             "optimizer": _bytes(state.opt_state) - _head_bytes(state.opt_state),
             "gradients": _bytes(state.grad_sum) - _head_bytes(state.grad_sum)}
    parts["other_state"] = _bytes(state) - sum(parts.values())
    return parts


def _breakdown(states, inputs, sizes: dict, update: dict | None = None) -> dict:
    """The parts of a program's peak. ``sizes``: XLA's sizes of the program the parts describe."""
    out = dict.fromkeys(PARTS, 0)
    for state in states:
        for key, value in state_parts(state).items():
            out[key] += value
    out["input"] = _bytes(inputs)
    out["outputs"] = sizes["outputs"] - sizes["aliased"]
    out["temporaries"] = sizes["temporaries"]
    out["training"] = peak_bytes(sizes)
    out["update"] = peak_bytes(update)
    out["peak"] = max(v for v in (out["training"], out["update"]) if v is not None)
    return out


def stage_breakdown(rule, state, x, y) -> dict:
    """``stage_peak``'s figure split into ``PARTS`` (bytes; the parts add up to the training program's
    peak), with ``training`` and ``update`` (each program's peak), ``peak`` (the larger) and
    ``residuals`` (jax's VJP residuals of the body: the activations kept for its backward pass)."""
    sizes = stage_peak(rule, state, x, y)
    if sizes["peak"] is None:
        return {"peak": None}
    out = _breakdown([state], (x, y), sizes["training"], sizes["update"])
    out["residuals"] = _bytes(jax.eval_shape(
        lambda s, inp: jax.tree.leaves(jax.vjp(lambda p: rule.apply_body(p, s.rest["body"], inp)[0],
                                               s.params["body"])[1]), state, x))
    return out


def step_breakdown(trainer, x, y) -> dict:
    """``costs.whole_step_peak`` (every stage's step as one program, states donated) split into ``PARTS``."""
    sizes = whole_step_sizes(trainer.rules, x, y)
    states = [jax.eval_shape(rule.init_state) for rule in trainer.rules]
    return {"peak": None} if sizes is None else _breakdown(states, (x, y), sizes)


def stage_breakdowns(trainer, x, y, only: int | None = None) -> list:
    """``stage_breakdown`` of every stage of ``trainer`` (of stage ``only``; ``{"peak": None}`` for the
    others), each at its own input."""
    out, h = [], x
    for rule in trainer.rules:
        state = jax.eval_shape(rule.init_state)
        out.append(stage_breakdown(rule, state, h, y) if only in (None, rule.k) else {"peak": None})
        h = jax.eval_shape(lambda s, inp, lab, rule=rule: forward_leaves(rule, s, inp, lab)[1], state, h, y)
    return out


# -- the table --------------------------------------------------------------------------------------
def memory_case(name: str, spec: dict, stages=(2, 4, 8), method: str = "chunked", remat: str = "none") -> dict:
    """Backprop's whole network on one device against the largest stage of the memory-balanced cut and
    of the even cut at each K, with the breakdown of every program; with a ``remat`` policy, ``row["remat"]``
    holds the same at K = 4 with that policy on both sides (``remat_case``)."""
    from lpjax import Trainer, stage_network
    from lpjax.core.methods import make_method

    x, y = example_shapes(spec)

    def trainer(num_stages, method_name, split, policy="none"):
        network = case_network(spec)
        if policy != "none" and num_stages > 1:  # the planner measures without remat: balance under it here
            from lpjax.research.balance import balanced_split
            split = balanced_split(network, num_stages, x, y, by="memory", remat=policy) if split else None
            cut = {"split_points": split.points} if split else {"num_stages": num_stages}
        else:
            cut = {"num_stages": num_stages, "split_points": split}
        model = stage_network(network, **cut, example=(x, y), rngs=nnx.Rngs(1))
        return (Trainer(model, method=make_method(method_name), optimizer=optax.adam(1e-3), remat=policy),
                split if policy != "none" else model.split)

    base = step_breakdown(trainer(1, "backprop", None)[0], x, y)
    row = {"name": name, "model": spec["model"], "batch": int(spec["batch"]), "backprop_bytes": base["peak"],
           "backprop_breakdown": base, "method": method, "local": {}}

    def ratio(value):
        return None if value is None or not base["peak"] else value / base["peak"]

    for k in map(int, stages):
        local, split = trainer(k, method, "balanced_memory")
        parts = stage_breakdowns(local, x, y)
        per_stage = [p["peak"] for p in parts]
        largest = None if None in per_stage else max(per_stage)
        if method == "chunked" and split.even_costs is not None:  # the balance measured it the same way
            even = [int(c) for c in split.even_costs]
        else:
            even = [p["peak"] for p in stage_breakdowns(trainer(k, method, None)[0], x, y)]
        even_largest = None if None in even else max(even)
        row["local"][k] = {"stage_bytes": per_stage, "largest": largest, "split_points": split.points,
                           "ratio": ratio(largest), "breakdown": parts,
                           "even": {"stage_bytes": even, "largest": even_largest, "ratio": ratio(even_largest)}}
    if remat != "none":
        row["remat"] = remat_case(trainer, x, y, method, remat, base["peak"])
    return row


def remat_case(trainer, x, y, method: str, policy: str, plain_bytes, num_stages: int = 4) -> dict:
    """Backprop and the memory-balanced cut (balanced under ``policy``) at ``num_stages``, both with the
    remat ``policy``: the largest stage over backprop without remat (``vs_plain``) and with (``vs_remat``),
    the even cut's beside them, and every program's breakdown."""
    base = step_breakdown(trainer(1, "backprop", None, policy)[0], x, y)
    local, split = trainer(num_stages, method, "balanced_memory", policy)
    if method == "chunked" and split.even_costs is not None:  # the balance measured every stage: break down
        per_stage = [int(c) for c in split.costs]  # only the largest (each breakdown is a compile)
        parts = stage_breakdowns(local, x, y, only=per_stage.index(max(per_stage)))
    else:
        parts = stage_breakdowns(local, x, y)
        per_stage = [p["peak"] for p in parts]
    largest = None if None in per_stage else max(per_stage)
    even = None if split.even_costs is None else int(max(split.even_costs))

    def over(value, by):
        return None if value is None or not by else value / by

    return {"policy": policy, "k": num_stages, "backprop_bytes": base["peak"], "backprop_breakdown": base,
            "split_points": split.points, "stage_bytes": per_stage, "largest": largest, "breakdown": parts,
            "vs_plain": over(largest, plain_bytes), "vs_remat": over(largest, base["peak"]),
            "even": {"largest": even, "vs_plain": over(even, plain_bytes), "vs_remat": over(even, base["peak"])}}


def memory_table(memory: dict, method: str = "chunked") -> list:
    """``memory_case`` of every model in a sweep's ``memory`` section ({stages, models, remat})."""
    stages = tuple(memory.get("stages", (2, 4, 8)))
    remat = memory.get("remat", "none")
    return [memory_case(name, spec, stages, method, remat) for name, spec in memory["models"].items()]


def memory_verdict(rows: list) -> dict:
    """The K = 4 ratios of the balanced cut (``ratios_k4``) and of the even cut (``even_k4``) per case, both
    sides without remat as in the paper, and whether every balanced ratio meets ``MEMORY_GOAL``;
    ``remat_k4``: the remat rows' ``{policy, vs_plain, vs_remat}`` per case, reported beside, not judged."""
    ratios = {r["name"]: _local(r, 4).get("ratio") for r in rows}
    even = {r["name"]: (_local(r, 4).get("even") or {}).get("ratio") for r in rows}
    remat = {r["name"]: {key: r["remat"][key] for key in ("policy", "vs_plain", "vs_remat")}
             for r in rows if r.get("remat")}
    done = [v for v in ratios.values() if v is not None]
    return {"ratios_k4": ratios, "even_k4": even, "remat_k4": remat, "goal": MEMORY_GOAL, "paper": PAPER_MEMORY,
            "reproduced": bool(done) and all(v <= MEMORY_GOAL for v in done)}


# -- the report -------------------------------------------------------------------------------------
def memory_lines(rows: list) -> list:
    """The memory table and, at K = 4 (else the middle K), the breakdown, as markdown lines."""
    stages = sorted({int(k) for r in rows for k in r["local"]})
    lines = ["### Memory per device (XLA memory analysis of the compiled programs)", "",
             "Peak bytes of one device's programs (arguments + outputs + temporaries - aliased, the stage state "
             "donated as the executors donate it). Backprop: the whole network on one device, its step compiled "
             f"as one program. A local method ({rows[0]['method'] if rows else 'chunked'}): the largest stage of "
             "the memory-balanced cut (measured with this accounting), the even cut's beside it. Nothing is "
             "trained.", "",
             "| model | batch | backprop, 1 device | " + " | ".join(f"K = {k}: balanced (even)" for k in stages) + " |",
             "|---|---|---|" + "---|" * len(stages)]
    for r in rows:
        cells = []
        for k in stages:
            c = _local(r, k)
            even = c.get("even") or {}
            cells.append("-" if c.get("largest") is None else
                         f"{format_bytes(c['largest'])} ({_ratio(c['ratio'])}) at {c['split_points']}; "
                         f"even {format_bytes(even.get('largest'))} ({_ratio(even.get('ratio'))})")
        lines.append(f"| {r['name']} | {r['batch']} | {format_bytes(r['backprop_bytes'])} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines += remat_lines(rows)
    return lines + breakdown_lines(rows, 4 if 4 in stages or not stages else stages[len(stages) // 2])


def remat_lines(rows: list) -> list:
    """The remat rows (``remat_case``) as a table: both ratios, named, and the verdict's basis."""
    rows = [r for r in rows if r.get("remat")]
    if not rows:
        return []
    policy, k = rows[0]["remat"]["policy"], rows[0]["remat"]["k"]
    lines = [f"#### With remat ({policy}), K = {k}", "",
             "The same accounting with the remat policy on the local stages and on backprop, the cut balanced "
             "under it. Two ratios: the largest stage with remat over backprop *without* remat (what remat buys "
             "a local method against the paper's baseline; not like for like) and over backprop *with* the same "
             "remat (like for like). The finding's verdict uses neither: like the paper, it compares both sides "
             "without remat (the table above).", "",
             "| model | backprop, no remat | backprop, remat | largest stage, remat (cut) | / backprop without remat "
             "| / backprop with remat | even cut, remat |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, even = r["remat"], r["remat"]["even"]
        lines.append(f"| {r['name']} | {format_bytes(r['backprop_bytes'])} | {format_bytes(m['backprop_bytes'])} | "
                     f"{format_bytes(m['largest'])} at {m['split_points']} | {_ratio(m['vs_plain'])} | "
                     f"{_ratio(m['vs_remat'])} | {format_bytes(even['largest'])} ({_ratio(even['vs_plain'])}; "
                     f"{_ratio(even['vs_remat'])}) |")
    return lines + [""]


def breakdown_lines(rows: list, num_stages: int = 4) -> list:
    """Where each program's bytes go, backprop's and every stage's of the balanced cut at ``num_stages``."""
    unit, scale = ("MiB", 2**20) if max((r["backprop_bytes"] or 0) for r in rows) >= 2**24 else ("KiB", 2**10)
    heads = ("parameters", "head", "optimizer + gradients", "other state", "input batch", "outputs",
             "temporaries (jax's VJP residuals)", "training peak", "update peak")
    lines = [f"#### Where the bytes go, K = {num_stages} ({unit})", "",
             "Parts of the training program's peak: they add up to it. Head: its parameters, gradient sum and "
             "optimizer slots. Outputs: the stage's output (and residuals kept for later losses), less what "
             "reuses the donated state. Temporaries hold the activations kept for the stage's own backward "
             "pass; jax's count of those (the body's VJP residuals) is in brackets, XLA keeps less.", "",
             "| model | program | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for r in rows:
        programs = [("backprop, whole network", r.get("backprop_breakdown") or {})]
        c = _local(r, num_stages)
        for k, part in enumerate(c.get("breakdown") or []):
            largest = " (largest)" if part.get("peak") is not None and part["peak"] == c.get("largest") else ""
            programs.append((f"stage {k}{largest}", part))
        m = r.get("remat") or {}
        if m.get("k") == num_stages:  # with remat: backprop and the largest stage
            programs.append((f"backprop, {m['policy']}", m.get("backprop_breakdown") or {}))
            programs += [(f"stage {k} (largest), {m['policy']}", part) for k, part in enumerate(m.get("breakdown") or [])
                         if part.get("peak") is not None][:1]
        for label, p in programs:
            if p.get("peak") is None:
                continue
            def size(value):
                return "-" if value is None else f"{value / scale:.1f}"

            residuals = f" ({size(p['residuals'])})" if "residuals" in p else ""
            cells = [size(p["parameters"]), size(p["head"]), size(p["optimizer"] + p["gradients"]),
                     size(p["other_state"]), size(p["input"]), size(p["outputs"]), size(p["temporaries"]) + residuals,
                     size(p["training"]), size(p["update"])]
            lines.append(f"| {r['name']} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _local(row: dict, k: int) -> dict:
    local = row["local"]
    return local.get(k, local.get(str(k), {}))


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_bytes(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"
