"""Cost accounting from XLA's own analysis of the compiled per-stage kernels (README.md, "Compute-efficiency curves").

Every figure comes from ``jax.jit(f).lower(...).compile().cost_analysis()`` (FLOPs, bytes accessed)
and ``.memory_analysis()`` (peak memory), lowered with abstract shapes, so nothing runs on the device.
Per stage k the pieces are lowered separately, at a fixed *cost batch* of B examples:

- ``forward``: the body ``F_k`` alone (train mode).
- ``backward``: one body backward pass, measured as cost(forward + backward) - cost(forward); with
  a window of w, up to w losses reach a stage and each costs one backward pass (the kernels apply
  each later loss's cotangent to the stored VJP residual separately). A pass that also sends a
  gradient to stage k-1 costs the input gradient as well; stage 0's input is data and never does.
- ``head``: the auxiliary head's forward and backward plus the loss, counted only where the method
  trains that head (backprop trains only the last).
- ``update``: one optimizer step. It is per *step*, not per example, so it is reported but left out
  of the per-example figures below, as in the paper's model.

Per step, with ``F_k`` the per-example FLOPs of stage k (forward + its backward passes + head):

- ``flops_per_example = Σ_k F_k``; ``compute = steps × batch × flops_per_example``.
- ideal time (the paper's idealised hardware, perfect data parallelism, so it does not depend on the
  batch size): backprop runs one example through the whole network, ``Σ_k F_k``, per step; a local
  method runs its stages in parallel, so a step takes ``max_k F_k``, the slowest stage.

Ideal time is in FLOP units (FLOPs on the critical path of one device); ``seconds(flops, device_flops)``
turns it into seconds for an assumed device throughput. XLA counts a matmul ``[B, n] @ [n, m]`` as
``2·B·n·m`` FLOPs and an elementwise op as one FLOP per output element (tests/test_costs.py pins this).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lpjax.errors import ConfigError

DEFAULT_COST_BATCH = 32


@dataclasses.dataclass
class Cost:
    """What XLA reports for one compiled function."""

    flops: float = 0.0
    bytes: float = 0.0
    peak_bytes: int | None = None  # arguments + outputs + temporaries - aliased; None if XLA does not say

    def __sub__(self, other):
        return Cost(max(self.flops - other.flops, 0.0), max(self.bytes - other.bytes, 0.0), None)


@dataclasses.dataclass
class StageCost:
    """One stage at the cost batch; ``backward`` already sums all the losses that reach the stage."""

    stage: int
    batch: int
    forward: Cost
    backward: Cost
    head: Cost
    update: Cost
    backward_passes: int  # losses whose gradient reaches this stage's body
    peak_bytes: int | None  # the largest compiled kernel of this stage (training forward or update)

    @property
    def flops_per_example(self) -> float:
        return (self.forward.flops + self.backward.flops + self.head.flops) / self.batch

    @property
    def bytes_per_example(self) -> float:
        return (self.forward.bytes + self.backward.bytes + self.head.bytes) / self.batch


@dataclasses.dataclass
class StepCost:
    method: str
    batch: int
    stages: list
    data_parallel_only: bool  # backprop: stages cannot run in parallel, the whole network is one unit
    step_peak_bytes: int | None = None  # backprop: the whole step compiled as one program (``whole_step_peak``)

    @property
    def flops_per_example(self) -> float:
        return sum(s.flops_per_example for s in self.stages)

    @property
    def ideal_flops_per_step(self) -> float:
        """FLOPs on the critical path of one device per step: the ideal time of a step in FLOP units."""
        if self.data_parallel_only:
            return self.flops_per_example
        return max(s.flops_per_example for s in self.stages)

    @property
    def update_flops(self) -> float:
        return sum(s.update.flops for s in self.stages)

    @property
    def peak_bytes_per_device(self) -> int | None:
        """Local methods hold one stage per device: the largest stage's peak. Backprop with data
        parallelism holds every stage and all their activations until the backward pass: the peak of
        its whole step compiled as one program. (The sum of the stages' separately compiled peaks
        would count every stage's temporaries at once and the activations between stages twice: for
        ResNet-32 at batch 128 in 4 stages 723 MiB against 468 MiB for the one program.)"""
        if self.data_parallel_only:
            return self.step_peak_bytes
        peaks = [s.peak_bytes for s in self.stages]
        return None if any(p is None for p in peaks) else max(peaks)

    def compute(self, steps, batch_size):
        """Total FLOPs of ``steps`` steps of ``batch_size`` examples (every head the method trains)."""
        return np.asarray(steps, dtype=np.float64) * batch_size * self.flops_per_example

    def ideal_time(self, steps):
        return np.asarray(steps, dtype=np.float64) * self.ideal_flops_per_step

    def totals(self) -> dict:
        """Per step at the cost batch, summed over stages: forward, backward, head, update."""
        out = {}
        for piece in ("forward", "backward", "head", "update"):
            out[f"{piece}_flops"] = sum(getattr(s, piece).flops for s in self.stages)
            out[f"{piece}_bytes"] = sum(getattr(s, piece).bytes for s in self.stages)
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "cost_batch": self.batch,
            "flops_per_example": self.flops_per_example,
            "ideal_flops_per_step": self.ideal_flops_per_step,
            "update_flops_per_step": self.update_flops,
            "peak_bytes_per_device": self.peak_bytes_per_device,
            **self.totals(),
            "stages": [{**dataclasses.asdict(s), "flops_per_example": s.flops_per_example,
                        "bytes_per_example": s.bytes_per_example} for s in self.stages],
        }


def seconds(flops, device_flops: float):
    """Ideal time in seconds on devices of ``device_flops`` FLOP/s at full utilisation."""
    if not device_flops > 0:
        raise ConfigError(f"device_flops must be a positive FLOP/s figure, got {device_flops!r}")
    return np.asarray(flops, dtype=np.float64) / device_flops


# -- XLA -------------------------------------------------------------------------------------------
def analyse(fn, *args, compile: bool = True) -> Cost:
    """FLOPs, bytes accessed and peak memory of ``jax.jit(fn)`` at the (abstract) ``args``.

    ``compile=False`` reads XLA's analysis of the lowered, unoptimised program instead: about 10x
    faster, no peak memory (only a compiled program has one), forward FLOPs within a few per cent of
    the compiled figure; backward FLOPs of strided convolutions can differ by up to a third, since XLA
    rewrites their gradients while compiling (tests/test_costs.py). Good for relative costs, such as
    balancing stages; the reports' figures use the compiled programs."""
    lowered = jax.jit(fn).lower(*args)
    if not compile:
        try:
            analysis = cost_dict(lowered.cost_analysis())
        except Exception:  # a backend without an HLO cost model: compile after all
            analysis = {}
        if "flops" in analysis:
            return Cost(float(analysis["flops"]), float(analysis.get("bytes accessed", 0.0)), None)
    compiled = lowered.compile()
    analysis = cost_dict(compiled.cost_analysis())
    return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)),
                peak_bytes(memory_analysis(compiled)) if compile else None)


def cost_dict(analysis) -> dict:
    """``cost_analysis()`` as one dict: jax returns a dict now, older releases a list with one dict per
    computation (the first is the entry computation), and some backends None."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return dict(analysis or {})


def memory_analysis(compiled) -> dict | None:
    """XLA's buffer sizes of a compiled program (``arguments``, ``outputs``, ``temporaries``,
    ``aliased``: outputs that reuse a donated argument's buffer), or None where the backend does not say."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if mem is None:
        return None
    return {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes)}


def peak_bytes(sizes: dict | None) -> int | None:
    """Arguments + outputs + temporaries - aliased: what the program holds at once, at most."""
    if sizes is None:
        return None
    return sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]


def abstract_like(tree):
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct`` (abstract values pass through)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype)
                        if not isinstance(a, jax.ShapeDtypeStruct) else a, tree)


# -- per stage ---------------------------------------------------------------------------------------
def stage_costs(rule, state, x, y, *, compile: bool = True) -> tuple:
    """``(StageCost, output shape)`` of one ``StageRule`` at the input ``x`` and labels ``y``
    (arrays or ShapeDtypeStructs with the batch as leading axis); ``compile`` as in ``analyse``."""
    analyse_ = functools.partial(analyse, compile=compile)
    batch = x.shape[0]
    params, rest = state.params, state.rest
    # ``state`` is abstract (ShapeDtypeStructs), so every part of it, the non-trainable ``rest`` (batch
    # statistics) included, must enter the lowered functions as an argument: a closure would hand the
    # ShapeDtypeStructs themselves to the module, and BatchNorm cannot read them.
    body_rest, head_rest = rest["body"], rest["head"]

    def body(bp, br, inp):
        return rule.apply_body(bp, br, inp)[0]

    def body_and_grads(bp, br, inp, cotangent, with_input):
        if not with_input:
            h, vjp = jax.vjp(lambda p: body(p, br, inp), bp)
        else:
            h, vjp = jax.vjp(lambda p, i: body(p, br, i), bp, inp)
        return h, vjp(cotangent)

    def head_loss_grads(hp, hr, h, labels):
        def loss(p, hidden):
            return rule.weight * rule.head_loss(p, hr, hidden, labels)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(hp, h)

    h = jax.eval_shape(body, params["body"], body_rest, x)
    forward = analyse_(body, params["body"], body_rest, x)
    # one backward pass per loss reaching the body; the input gradient only where it is passed on
    needs = [rule.sends_own_gradient] if rule.trains_head else []
    needs += [rule.passes_on[j] for j in rule.sources]
    if rule.k == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
        needs = [False] * len(needs)
    backward = Cost()
    for with_input in sorted(set(needs)):
        both = analyse_(functools.partial(body_and_grads, with_input=with_input), params["body"], body_rest, x, h)
        backward.flops += (both - forward).flops * needs.count(with_input)
        backward.bytes += (both - forward).bytes * needs.count(with_input)
    head = analyse_(head_loss_grads, params["head"], head_rest, h, y) if rule.trains_head else Cost()
    update = analyse_(rule.update, state)
    peak = stage_peak(rule, state, x, y)["peak"] if compile else None
    cost = StageCost(stage=rule.k, batch=batch, forward=forward, backward=backward, head=head, update=update,
                     backward_passes=len(needs), peak_bytes=peak)
    return cost, h


def stage_peak(rule, state, x, y) -> dict:
    """What one device holding stage ``rule`` needs, as the executors run it: the larger of its compiled
    training forward (body, own loss and backward, the VJP residuals it keeps for later losses) and its
    optimizer update, each with the stage state donated and kept whole (a buffer the program does not
    read, such as the gradient sum that a step's first forward overwrites, is still held).

    Returns ``{"training", "update"}`` (XLA's buffer sizes, ``memory_analysis``) and ``peak`` (bytes;
    None where XLA does not say)."""
    compiled = {
        "training": jax.jit(lambda s, inp, lab: forward_leaves(rule, s, inp, lab), donate_argnums=0,
                            keep_unused=True).lower(state, x, y).compile(),
        "update": jax.jit(rule.update, donate_argnums=0, keep_unused=True).lower(state).compile(),
    }
    sizes = {name: memory_analysis(c) for name, c in compiled.items()}
    peaks = [peak_bytes(v) for v in sizes.values()]
    return {**sizes, "peak": None if None in peaks else max(peaks)}


def forward_leaves(rule, state, x, y):
    """A stage's training forward with its residual flattened to leaves: what a cost analysis lowers."""
    state, h, own_dx, residual, metrics = rule.forward(state, x, y, True)
    return state, h, own_dx, jax.tree.leaves(residual), metrics


def step_cost(trainer, x, y, *, compile: bool = True) -> StepCost:
    """Costs of one training step of ``trainer`` (its method and stages) on a batch shaped like
    ``(x, y)``; ``x`` and ``y`` may be arrays or ``jax.ShapeDtypeStruct``s. ``compile=False``: FLOPs
    of the lowered programs only, no peak memory (``analyse``)."""
    x, y = abstract_like(x), abstract_like(y)
    if not x.shape or x.shape[0] < 1:
        raise ConfigError(f"cost accounting needs a batch with a leading batch axis, got input shape {x.shape}")
    stages, h = [], x
    for rule in trainer.rules:
        state = jax.eval_shape(rule.init_state)
        cost, h = stage_costs(rule, state, h, y, compile=compile)
        stages.append(cost)
    together = trainer.method.needs_flush
    step_peak = whole_step_peak(trainer.rules, x, y) if together and compile else None
    return StepCost(method=trainer.method.name, batch=x.shape[0], stages=stages, data_parallel_only=together,
                    step_peak_bytes=step_peak)


def whole_step(rules, states, x, y):
    """One synchronous step of every stage on one batch, as one function: every forward in stage order,
    every later loss's cotangent back through the stages that it reaches, then every update (one-tree
    methods with the global gradient norm). What one device holds when it runs backprop."""
    h, forwards = x, []
    for rule, state in zip(rules, states):
        state, h, own_dx, residual, _ = rule.forward(state, h, y, True)
        forwards.append((state, own_dx, residual))
    states, messages = [None] * len(rules), {}  # messages: (receiving stage, loss) -> cotangent
    for rule, (state, own_dx, residual) in zip(reversed(rules), reversed(forwards)):
        incoming = {j: messages.pop((rule.k, j)) for j in rule.sources if (rule.k, j) in messages}
        passed = {}
        if incoming:
            state, passed = rule.backward(state, {j: residual for j in incoming}, incoming)
        if own_dx is not None:
            passed[rule.k] = own_dx
        messages.update({(rule.k - 1, j): cotangent for j, cotangent in passed.items()})
        states[rule.k] = state
    if rules[0].one_tree:
        total_sq = sum(rule.grad_sq_norm(state) for rule, state in zip(rules, states))
        return [rule.update(state, total_sq) for rule, state in zip(rules, states)]
    return [rule.update(state) for rule, state in zip(rules, states)]


def whole_step_sizes(rules, x, y) -> dict | None:
    """XLA's buffer sizes (``memory_analysis``) of ``whole_step`` compiled as one program, the stage
    states donated and kept whole, as the reference executor runs a flushed step."""
    states = [jax.eval_shape(rule.init_state) for rule in rules]
    program = jax.jit(functools.partial(whole_step, rules), donate_argnums=0, keep_unused=True)
    return memory_analysis(program.lower(states, x, y).compile())


def whole_step_peak(rules, x, y) -> int | None:
    """Peak bytes of ``whole_step_sizes``: backprop's memory on one device, whatever its number of stages."""
    return peak_bytes(whole_step_sizes(rules, x, y))


def experiment_cost(experiment, batch: int = DEFAULT_COST_BATCH, *, compile: bool = True) -> StepCost:
    """``step_cost`` of an ``Experiment`` (``lpjax.config.build.build_experiment``) at ``batch`` examples
    of its training data (fewer if the training split is smaller); ``compile`` as in ``step_cost``."""
    data = experiment.dataset
    batch = max(1, min(int(batch), int(getattr(data, "num_train", batch))))
    if hasattr(data, "example_batch"):
        x, y = data.example_batch(batch)
    else:
        x, y = data.train_x[:batch], data.train_y[:batch]
    return step_cost(experiment.trainer, x, y, compile=compile)


def format_flops(value) -> str:
    """``1.23 GFLOP`` style, for reports."""
    if value is None or not math.isfinite(value):
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}FLOP"
    return f"{value:.3g} FLOP"
