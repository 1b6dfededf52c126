"""Just enough of XLA's HLO text (``compiled.as_text()``) to find collectives and the loops they run in:
computations, instructions, shape sizes, what an instruction calls, and while-loop trip counts.

Trip counts come from XLA's ``known_trip_count`` annotation where it writes one (the CPU compiler
does for ``lax.scan``), else they are read off the loop: a counter that starts at a constant
(through copies), a ``counter < constant`` condition and a ``+1`` step, which is what the TPU
compiler leaves of every scan tried. ``compiled.cost_analysis()`` multiplies by no trip count. A loop
whose condition compares its counter with a flag it carries runs 0 or 1 times (``runs_at_most_once``).
"""

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "token": 0, "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_PASS_THROUGH = ("copy", "bitcast", "convert")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result shape's text
    opcode: str
    operands: list  # operand names
    attrs: str  # the text after the operands
    computation: str  # the computation it belongs to
    args: str = ""  # the text inside the parentheses (a constant's value)
    is_root: bool = False


def closing(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """The index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse_module(text: str):
    """Read an HLO module's text.

    Args:
      text: ``compiled.as_text()`` (or any HLO module text).

    Returns:
      ``(computations, entry)``: ``{name: [Instruction]}`` and the entry computation's name.
    """
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line.strip()) if not line.startswith(" ") else None
            if match and not line.startswith("HloModule"):
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        rest = line[match.end():]
        if rest.startswith("("):  # a tuple shape
            end = closing(rest, 0)
            shape, rest = rest[:end], rest[end:].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        opcode = re.match(r"([\w\-]+)\(", rest)
        if not opcode:
            continue
        end = closing(rest, opcode.end() - 1)
        inside = rest[opcode.end():end - 1]
        computations[current].append(Instruction(match.group(2), shape, opcode.group(1), re.findall(r"%([\w.\-]+)", inside),
                                                 rest[end:], current, inside, bool(match.group(1))))
    return computations, entry


def shape_bytes(shape: str) -> int:
    """Logical bytes of an HLO shape: a tuple's elements summed, layouts and tiling ignored."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return int(math.ceil(total))


def called_computations(inst: Instruction) -> list:
    """``[(computation, role)]`` that ``inst`` calls; the role is the attribute naming it
    (``body`` and ``condition`` for a while loop)."""
    out = []
    for key in ("body", "condition", "to_apply", "calls", "true_computation", "false_computation"):
        out += [(m.group(1), key) for m in re.finditer(rf"\b{key}=%?([\w.\-]+)", inst.attrs)]
    for key in ("branch_computations", "calls", "called_computations"):
        listed = re.search(rf"\b{key}=\{{([^}}]*)\}}", inst.attrs)
        if listed:
            out += [(name, key) for name in re.findall(r"%?([\w.\-]+)", listed.group(1))]
    return out


def _root(instructions):
    return next((i for i in instructions if i.is_root), instructions[-1])


def _through(inst, by_name):
    """What a chain of copies, bitcasts and converts starts from."""
    for _ in range(8):
        if inst is None or inst.opcode not in _PASS_THROUGH or not inst.operands:
            return inst
        inst = by_name.get(inst.operands[0])
    return inst


def _constant(inst, by_name):
    inst = _through(inst, by_name)
    if inst is None or inst.opcode != "constant":
        return None
    match = re.fullmatch(r"\s*(-?\d+)\s*", inst.args)
    return int(match.group(1)) if match else None


def trip_count(loop: Instruction, computations) -> tuple:
    """How many times a while loop runs.

    Args:
      loop: a ``while`` instruction.
      computations: ``parse_module``'s computations.

    Returns:
      ``(trips, source)``, source ``"known_trip_count"`` or ``"inferred"``; ``(None, None)`` when
      the loop is not a counted one.
    """
    known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', loop.attrs)
    if known:
        return int(known.group(1)), "known_trip_count"
    try:
        roles = {role: name for name, role in called_computations(loop) if role in ("body", "condition")}
        condition, body = computations[roles["condition"]], computations[roles["body"]]
        in_condition = {i.name: i for i in condition}
        compare = _root(condition)
        if compare.opcode != "compare" or len(compare.operands) != 2:
            return None, None
        direction = re.search(r"direction=(\w+)", compare.attrs).group(1)
        counter, limit = (_through(in_condition.get(o), in_condition) for o in compare.operands)
        if direction == "GT":
            counter, limit, direction = limit, counter, "LT"
        if direction != "LT" or counter is None or counter.opcode != "get-tuple-element":
            return None, None
        index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
        caller = {i.name: i for i in computations[loop.computation]}
        initial = caller.get(loop.operands[0])
        if initial is None or initial.opcode != "tuple":
            return None, None
        start, end = _constant(caller.get(initial.operands[index]), caller), _constant(limit, in_condition)
        in_body = {i.name: i for i in body}
        body_root = _root(body)
        step = in_body.get(body_root.operands[index]) if body_root.opcode == "tuple" else None
        if step is None or step.opcode != "add":
            return None, None
        operands = [_through(in_body.get(o), in_body) for o in step.operands]
        counters = [o for o in operands if o is not None and o.opcode == "get-tuple-element"
                    and re.search(rf"index={index}\b", o.attrs)]
        increments = [_constant(o, in_body) for o in operands if o is not None and o not in counters]
        if start is None or end is None or not counters or increments != [1]:
            return None, None
        return max(0, end - start), "inferred"
    except (KeyError, AttributeError, IndexError):
        return None, None


def runs_at_most_once(loop: Instruction, computations) -> bool:
    """Whether a while loop's condition compares its counter with a ``pred[]`` it carries: lpjax's
    0-or-1-trip loop (``program._once``), which runs a stage's task or update only on the devices
    whose stage it is, and only when the flag is set."""
    roles = {role: name for name, role in called_computations(loop) if role == "condition"}
    condition = computations.get(roles.get("condition"), [])
    if not condition:
        return False
    by_name = {i.name: i for i in condition}
    read = [_through(by_name.get(o), by_name) for o in _root(condition).operands]
    return any(r is not None and r.opcode == "get-tuple-element" and r.shape.startswith("pred[]") for r in read)
