"""HBM traffic of a compiled program, read from its optimized HLO text, loops counted in full.

XLA's `cost_analysis()["bytes accessed"]` counts a while loop's body once, so a step with scanned
blocks (or accumulated microbatches) looks lighter than the program that runs. This module reads
`compiled.as_text()` instead: every top-level instruction (a fusion, a copy, a dot, a collective)
reads its operands from HBM and writes its result there, so its traffic is the bytes of those
buffers; a while loop's body counts as often as the loop runs (`known_trip_count`, or the
bound of its `i < N` condition where the backend gives none, as libtpu does). What is inside a fusion stays on
chip and is not counted; a fusion operand that the fusion only slices counts the slice, and an
in-place dynamic-update-slice counts the update (how scanned layers read and write their
stacked weights and activations).

Buffers are counted at their padded size where the layout is tiled (TPU: `T(8,128)` pads the two
minor physical dimensions to 8 and 128), which is what moves through HBM; `logical=True` counts
the unpadded shapes. The estimate is checked against XLA's own count of unscanned programs in
tests/training/test_hlo_cost.py and BENCHMARKS.md ("Where the bytes go").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2}
DTYPE_BYTES.update({"u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
DTYPE_BYTES.update({"f8e4m3fn": 1, "f8e5m2": 1, "c64": 8, "c128": 16})

# Instructions that move no HBM bytes themselves (aliases, bookkeeping), or whose traffic is
# their called computations' (while, conditional, call).
FREE_OPS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
}
SLICING_OPS = {"dynamic-slice", "slice"}

_HEADER = re.compile(r"^(ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\](?:\{(?P<layout>[^}]*)\})?")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_KIND = re.compile(r"\bkind=(k\w+)")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: str  # the result's shape text (an array or a tuple of arrays)
    operands: list[str]
    calls: dict[str, str]  # calls / body / condition / to_apply -> computation name
    branches: list[str]
    trip_count: int | None
    op_name: str
    args: str = ""  # the text inside the parentheses (a parameter's index, a constant)
    attrs: str = ""  # the text after them
    fusion_kind: str = ""  # kLoop, kOutput, kInput, kCustom
    is_root: bool = False


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str

    def shapes(self) -> dict[str, str]:
        return {i.name: i.shape for comp in self.computations.values() for i in comp}


def _split_balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({":
            depth += 1
        elif text[i] in ")}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m["rest"]
    if rest.startswith("("):
        end = _split_balanced(rest, 0)
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    args_end = _split_balanced(rest, paren)
    args, attrs = rest[paren + 1 : args_end - 1], rest[args_end:]
    trip = _TRIP.search(attrs)
    branches = _BRANCHES.search(attrs)
    op_name = _OP_NAME.search(attrs)
    kind = _KIND.search(attrs)
    return Instruction(
        name=m["name"],
        opcode=opcode,
        shape=shape,
        operands=_OPERAND.findall(args),
        calls={k: v for k, v in _CALLS.findall(attrs)},
        branches=_OPERAND.findall(branches.group(1)) if branches else [],
        trip_count=int(trip.group(1)) if trip else None,
        op_name=op_name.group(1) if op_name else "",
        args=args,
        attrs=attrs,
        fusion_kind=kind.group(1) if kind else "",
        is_root=bool(m.group(1)),
    )


def parse(hlo_text: str) -> Module:
    """The computations of an HLO module's text (`compiled.as_text()`)."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "->" in line:
                current = m["name"]
                computations[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        instr = _parse_instruction(line)
        if instr is not None:
            computations[current].append(instr)
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    return Module(computations, entry)


def array_bytes(shape: str, logical: bool = False) -> float:
    """Bytes of every array in a shape's text, padded to its layout's tiles unless `logical`."""
    total = 0.0
    for m in _ARRAY.finditer(shape):
        dtype = m["dtype"]
        if dtype not in DTYPE_BYTES:
            continue  # token[], opaque
        dims = [int(d) for d in m["dims"].split(",") if d]
        layout = m["layout"] or ""
        if not logical and ":" in layout and dims:
            order, tiling = layout.split(":", 1)
            minor_to_major = [int(d) for d in order.split(",") if d.strip().isdigit()]
            tile = re.search(r"T\(([0-9,]+)\)", tiling)
            if tile and len(minor_to_major) == len(dims):
                physical = [dims[d] for d in reversed(minor_to_major)]
                sizes = [int(t) for t in tile.group(1).split(",")]
                for k, t in enumerate(reversed(sizes)):
                    if k < len(physical):
                        j = len(physical) - 1 - k
                        physical[j] = -(-physical[j] // t) * t
                dims = physical
        total += DTYPE_BYTES[dtype] * math.prod(dims)
    return total


@dataclasses.dataclass(frozen=True)
class Access:
    """One top-level instruction's traffic, `times` the number of times it runs."""

    op_name: str
    opcode: str
    kind: str  # the fusion kind (kLoop, kOutput, ...) or the opcode
    bytes: float
    times: int


class _Counter:
    def __init__(self, module: Module, logical: bool, loops: bool = True):
        self.module, self.logical, self.loops = module, logical, loops
        self.shapes = module.shapes()
        self.by_name = {i.name: i for comp in module.computations.values() for i in comp}

    def size(self, name: str) -> float:
        return array_bytes(self.shapes.get(name, ""), self.logical)

    def _fused_operand_bytes(self, instr: Instruction) -> tuple[list[float], float]:
        """Per-operand and result bytes of a fusion: sliced operands count their slices, an
        in-place dynamic-update-slice root counts its update."""
        body = self.module.computations.get(instr.calls.get("calls", ""), [])
        params: dict[int, str] = {}
        users: dict[str, list[Instruction]] = {}
        for i in body:
            if i.opcode == "parameter" and i.args.strip().isdigit():
                params[int(i.args)] = i.name
            for op in i.operands:
                users.setdefault(op, []).append(i)
        operand_bytes = [self.size(op) for op in instr.operands]
        result_bytes = self.size(instr.name)
        root = next((i for i in body if i.is_root), body[-1] if body else None)
        roots = (
            [self.by_name[o] for o in root.operands if o in self.by_name]
            if root is not None and root.opcode == "tuple"
            else [root]
            if root is not None
            else []
        )
        in_place: set[str] = set()
        for r in roots:
            if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
                buffer = _through_bitcasts(r.operands[0], self.by_name)
                in_place.add(buffer)
                result_bytes -= self.size(r.name) - self.size(r.operands[1])
        for idx, pname in params.items():
            if idx >= len(operand_bytes):
                continue
            if pname in in_place:
                operand_bytes[idx] = 0.0
                continue
            sliced = _slice_users(pname, users)
            if sliced is not None:
                operand_bytes[idx] = min(operand_bytes[idx], sum(self.size(s) for s in sliced))
        return operand_bytes, max(result_bytes, 0.0)

    def trip_count(self, loop: Instruction, caller: str) -> int:
        """A while loop's trip count where the backend config does not give it: the condition
        `counter < N` (a scan's), with the counter's start read from the loop's initial tuple
        where it is a constant there (0 otherwise, as scans start)."""
        condition = self.module.computations.get(loop.calls.get("condition", ""), [])
        root = next((i for i in condition if i.is_root), condition[-1] if condition else None)
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
            raise ValueError(f"cannot tell how often {loop.name} runs (no known_trip_count)")
        local = {i.name: i for i in condition}
        counter = local.get(root.operands[0]) if root.operands else None
        bound = local.get(root.operands[1]) if len(root.operands) > 1 else None
        if counter is None or bound is None or bound.opcode != "constant":
            raise ValueError(f"cannot tell how often {loop.name} runs (its condition is not i < N)")
        index = (
            re.search(r"index=(\d+)", counter.attrs)
            if counter.opcode == "get-tuple-element"
            else None
        )
        start = 0
        callers = {i.name: i for i in self.module.computations.get(caller, [])}
        init = callers.get(loop.operands[0]) if loop.operands else None
        if index is not None and init is not None and init.opcode == "tuple":
            first = callers.get(init.operands[int(index.group(1))])
            if first is not None and first.opcode == "constant":
                start = int(first.args)
        return max(int(bound.args) - start, 0)

    def instruction_bytes(self, instr: Instruction) -> float:
        if instr.opcode == "fusion":
            operands, result = self._fused_operand_bytes(instr)
            return sum(operands) + result
        if instr.opcode in SLICING_OPS:
            return 2 * self.size(instr.name)
        if instr.opcode == "dynamic-update-slice" and len(instr.operands) > 1:
            return 2 * self.size(instr.operands[1])
        return self.size(instr.name) + sum(self.size(op) for op in instr.operands)

    def walk(self, computation: str, times: int) -> Iterator[Access]:
        for instr in self.module.computations.get(computation, []):
            if instr.opcode in FREE_OPS:
                continue
            if instr.opcode == "while":
                trips = (
                    (instr.trip_count or self.trip_count(instr, computation)) if self.loops else 1
                )
                yield from self.walk(instr.calls.get("body", ""), times * trips)
                yield from self.walk(instr.calls.get("condition", ""), times * trips)
                continue
            if instr.opcode == "call":
                yield from self.walk(instr.calls.get("to_apply", ""), times)
                continue
            if instr.opcode == "conditional" and instr.branches:
                # The heaviest branch: an upper bound on what one run of it moves.
                heaviest = max(
                    instr.branches,
                    key=lambda b: sum(a.bytes * a.times for a in self.walk(b, 1)),
                )
                yield from self.walk(heaviest, times)
                continue
            kind = instr.fusion_kind or "fusion" if instr.opcode == "fusion" else instr.opcode
            yield Access(instr.op_name, instr.opcode, kind, self.instruction_bytes(instr), times)


def _through_bitcasts(name: str, by_name: dict[str, Instruction]) -> str:
    while name in by_name and by_name[name].opcode == "bitcast" and by_name[name].operands:
        name = by_name[name].operands[0]
    return name


def _slice_users(name: str, users: dict[str, list[Instruction]]) -> list[str] | None:
    """The slices that read `name` (through bitcasts), or None if anything else reads it."""
    found: list[str] = []
    for user in users.get(name, []):
        if user.opcode == "bitcast":
            inner = _slice_users(user.name, users)
            if inner is None:
                return None
            found.extend(inner)
        elif user.opcode in SLICING_OPS and user.operands and user.operands[0] == name:
            found.append(user.name)
        else:
            return None
    return found or None


def accesses(hlo: str | Module, logical: bool = False, loops: bool = True) -> list[Access]:
    """Every top-level instruction's traffic, loop bodies with their trip counts (`loops`) or
    once (as XLA's cost analysis counts them). `hlo` is the HLO text or its `parse`."""
    module = parse(hlo) if isinstance(hlo, str) else hlo
    return list(_Counter(module, logical, loops).walk(module.entry, 1))


def bytes_accessed(hlo: str | Module, logical: bool = False, loops: bool = True) -> float:
    """The program's HBM traffic, every loop body counted as often as it runs (`loops`)."""
    return sum(a.bytes * a.times for a in accesses(hlo, logical, loops))
