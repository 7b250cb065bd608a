"""HBM traffic read from optimized HLO (`hiera_jax.training.cost.hlo_cost`), loops counted in full.

The reference is XLA's own `bytes accessed`: of a scanned program with its body counted once
(`loops=False` must agree), and of the same program unrolled, which has no loop to undercount
(the loop-aware count must agree). tests/training/test_train_aot.py checks the fit check's figure against
the unscanned TPU program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hiera_jax.training.cost import hlo_cost

STEPS = 8


def scanned(unroll: int):
    def step(h, w):
        return jnp.tanh(h @ w) + h, None

    def f(x, ws):
        return jax.lax.scan(step, x, ws, unroll=unroll)[0]

    x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    ws = jax.ShapeDtypeStruct((STEPS, 512, 512), jnp.float32)
    compiled = jax.jit(f).lower(x, ws).compile()
    return compiled.as_text(), float(compiled.cost_analysis()["bytes accessed"])


def test_loops_count_as_often_as_they_run():
    looped_text, looped_xla = scanned(unroll=1)
    unrolled_text, unrolled_xla = scanned(unroll=STEPS)
    assert " while(" in looped_text and " while(" not in unrolled_text
    # Body once: what XLA counts, to 1%; XLA misses most of the program's traffic that way.
    once = hlo_cost.bytes_accessed(looped_text, loops=False)
    assert abs(once / looped_xla - 1) < 0.01, (once, looped_xla)
    assert looped_xla < 0.3 * unrolled_xla
    # Every trip: what XLA counts once the loop is unrolled, to 5%.
    full = hlo_cost.bytes_accessed(looped_text)
    assert abs(full / unrolled_xla - 1) < 0.05, (full, unrolled_xla)
    # No loop: the two counts are the same.
    assert hlo_cost.bytes_accessed(unrolled_text) == hlo_cost.bytes_accessed(
        unrolled_text, loops=False
    )


def test_tiled_layouts_count_their_padding():
    # bf16 [16, 196, 96] tiled (8, 128) on its two minor dimensions: 196 -> 200, 96 -> 128.
    assert hlo_cost.array_bytes("bf16[16,196,96]{2,1,0:T(8,128)(2,1)}") == 16 * 200 * 128 * 2
    assert hlo_cost.array_bytes("bf16[16,196,96]{2,1,0:T(8,128)(2,1)}", logical=True) == (
        16 * 196 * 96 * 2
    )
    # A permuted layout tiles its physical minor dimensions: {1,2,0} stores [2, 100, 50176], so
    # 100 pads to 104 (not to 128, as the logical order would have it).
    assert hlo_cost.array_bytes("f32[2,50176,100]{1,2,0:T(8,128)}") == 4 * 2 * 104 * 50176
    # Tuples add up; untiled (CPU) layouts are their logical size; tokens are free.
    assert hlo_cost.array_bytes("(f32[3]{0}, s32[2,2]{1,0}, token[])") == 12 + 16


# A TPU-style loop: no known_trip_count in its backend config, the bound is the condition's.
LOOP = """HloModule m

%body (p: (s32[], f32[128,128])) -> (s32[], f32[128,128]) {
  %p = (s32[], f32[128,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[128,128]{1,0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  %y = f32[128,128]{1,0} exponential(%x)
  ROOT %t = (s32[], f32[128,128]{1,0}) tuple(%j, %y)
}

%cond (p: (s32[], f32[128,128])) -> pred[] {
  %p = (s32[], f32[128,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(BOUND)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[128,128]) -> f32[128,128] {
  %a = f32[128,128]{1,0} parameter(0)
  %start = s32[] constant(START)
  %init = (s32[], f32[128,128]{1,0}) tuple(%start, %a)
  %w = (s32[], f32[128,128]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[128,128]{1,0} get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("start,bound", [(0, 12), (2, 12)])
def test_trip_count_from_the_loop_condition(start, bound):
    text = LOOP.replace("BOUND", str(bound)).replace("START", str(start))
    # exp reads and writes the matrix; the counter's add and the condition's compare.
    per_trip = 2 * 128 * 128 * 4 + 3 * 4 + (4 + 4 + 1)
    assert hlo_cost.bytes_accessed(text, logical=True) == (bound - start) * per_trip
    assert hlo_cost.bytes_accessed(text, logical=True, loops=False) == per_trip


def test_a_loop_it_cannot_count_is_an_error():
    text = LOOP.replace("direction=LT", "direction=NE").replace("BOUND", "4")
    with pytest.raises(ValueError, match="cannot tell how often"):
        hlo_cost.bytes_accessed(text.replace("START", "0"))
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_cost.bytes_accessed("HloModule m\n")
