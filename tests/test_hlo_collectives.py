"""The collective reader (lpjax/distributed/hlo_collectives.py, hlo_text.py, replica_groups.py) on
programs compiled for the host's CPU devices, on hand-written TPU-style HLO, and, where libtpu is
installed, on deviceless TPU compiles (v5e:2x2, and two v4 slices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding

from lpjax.distributed import hlo_collectives as H
from lpjax.distributed.hlo_text import shape_bytes
from lpjax.distributed.replica_groups import AxisMap, parse_groups
from lpjax.executors import topology as T
from lpjax.executors import torus

T.quiet_libtpu_env()
CLOCKS = 5


def pipeline(mesh, rows=16, width=128):
    """A toy pipeline compiled on ``mesh``: a scan over clocks with a ppermute over stage and a pmean
    over data, then one all_gather over stage after the scan."""
    K = mesh.shape["stage"]

    def body(w, x):
        def clock(h, _):
            h = jax.lax.ppermute(jnp.tanh(h @ w[0]), "stage", [(i, i + 1) for i in range(K - 1)])
            return h + jax.lax.pmean(h * 2.0, "data"), None

        h, _ = jax.lax.scan(clock, x, None, length=CLOCKS)
        return jax.lax.all_gather(h.sum(), "stage")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(jax.P("stage"), jax.P("data")), out_specs=jax.P(),
                              check_vma=False))
    w = jax.ShapeDtypeStruct((K, width, width), jnp.float32, sharding=NamedSharding(mesh, jax.P("stage")))
    x = jax.ShapeDtypeStruct((rows, width), jnp.float32, sharding=NamedSharding(mesh, jax.P("data")))
    return f.lower(w, x).compile()


def cpu_mesh(order=(0, 1, 2, 3)):
    devices = [jax.devices()[i] for i in order]
    return Mesh(np.array(devices).reshape(2, 2), ("stage", "data"), axis_types=(AxisType.Auto,) * 2)


def check_pipeline(colls):
    inside = [c for c in colls if c.loops]
    outside = [c for c in colls if not c.loops]
    assert sorted(c.kind for c in inside) == ["all-reduce", "collective-permute"]  # an async pair counts once
    perm = next(c for c in inside if c.kind == "collective-permute")
    pmean = next(c for c in inside if c.kind == "all-reduce")
    assert perm.axis == "stage" and 1 in perm.shifts
    assert pmean.axis == "data" and pmean.scope == "per clock"
    # the all_gather of a scalar after the scan (the TPU compiler makes it an all-reduce)
    assert len(outside) == 1 and outside[0].kind in ("all-gather", "all-reduce")
    assert outside[0].axis == "stage" and outside[0].scope == "per step" and outside[0].per_step_count == 1
    assert [t for _, t in pmean.loops] == [CLOCKS] and pmean.per_step_count == CLOCKS
    return perm, pmean


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (2, 0, 3, 1)])
def test_a_cpu_pipeline_has_a_stage_ppermute_and_a_data_pmean_per_clock(order):
    mesh = cpu_mesh(order)  # permuted devices: the program's ids are still mesh positions
    colls = H.collectives(pipeline(mesh).as_text(), mesh)
    perm, pmean = check_pipeline(colls)
    assert pmean.bytes == 8 * 128 * 4  # one data slice's rows, f32
    assert sorted(perm.pairs) == [(0, 2), (1, 3)]
    assert perm.pair_hops is None  # CPU devices have no coordinates
    rows = H.summarize(colls)
    clock = next(r for r in rows if r["scope"] == "per clock" and r["kind"] == "all-reduce")
    assert clock["per_step_bytes"] == CLOCKS * clock["bytes"]
    assert "per clock" in H.format_table(rows) and '"summary"' in H.to_json(colls)
    assert H.bytes_per_axis(colls)["data"] == CLOCKS * pmean.bytes
    assert [p["pairs"] for p in H.hop_pairs(colls)] == [[(a, b, None) for a, b in perm.pairs]]


def test_the_three_spellings_of_replica_groups_name_the_same_axes():
    amap = AxisMap(("stage", "data"), (2, 4))
    assert parse_groups("replica_groups={{0,1,2,3},{4,5,6,7}}, x")[1] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parse_groups("replica_groups=[4,2]<=[2,4]T(1,0), x")[1] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert parse_groups("replica_groups=[2,4]<=[8], x")[1] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parse_groups("replica_groups={}, x", 8)[1] == [list(range(8))]
    groups = parse_groups("replica_groups=mesh['stage'=2,'data'=4] {'data'}, use_global_device_ids=true")[1]
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and amap.group_axis(groups) == "data"
    groups = parse_groups("replica_groups=mesh['stage'=2,'data'=4] {'stage'}, x")[1]
    assert groups == [[0, 4], [1, 5], [2, 6], [3, 7]] and amap.group_axis(groups) == "stage"
    groups = parse_groups("replica_groups=mesh['stage'=2,'data'=4] {'stage','data'}, x")[1]
    assert groups == [list(range(8))] and amap.group_axis(groups) == "stage,data"
    major = parse_groups("replica_groups=mesh['stage'=2,'data'=4] {'data':(1)2}, x")[1]
    minor = parse_groups("replica_groups=mesh['stage'=2,'data'=4] {'data':(2)2}, x")[1]
    assert major == [[0, 2], [1, 3], [4, 6], [5, 7]] and minor == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert amap.group_axis(minor) == "data[2 of 4]"
    assert parse_groups("replica_groups=mesh[a=2,b=2], device_ids=(0,2,1,3) {b}, x")[1] == [[0, 2], [1, 3]]
    form, pairs = parse_groups("source_target_pairs={{0,4},{1,5}}, x")
    assert form == "pairs" and amap.pair_axis(pairs) == ("stage", [1])


def test_shape_bytes_are_logical_bytes():
    assert shape_bytes("f32[32,128]{1,0:T(8,128)S(1)}") == 16384
    assert shape_bytes("(f32[2,2]{1,0}, bf16[4]{0}, s32[])") == 16 + 8 + 4
    assert shape_bytes("pred[]") == 1


TPU_LOOP = """HloModule m, num_partitions=4

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %c = s32[] get-tuple-element(%p), index=0
  %cc = s32[] copy(%c)
  %one = s32[] constant(1)
  %next = s32[] add(%cc, %one)
  %v = f32[8] get-tuple-element(%p), index=1
  %cp = (f32[8], f32[8], u32[], u32[]) collective-permute-start(%v), channel_id=1, source_target_pairs={{0,2},{1,3}}
  %cpd = f32[8] collective-permute-done(%cp)
  %ar = f32[8] all-reduce(%cpd), channel_id=2, replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%next, %ar)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8] parameter(0)
  %zero = s32[] constant(2)
  %z = s32[] copy(%zero)
  %init = (s32[], f32[8]) tuple(%z, %x)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8] get-tuple-element(%w), index=1
}
"""


def test_a_loop_without_known_trip_count_has_its_trips_read_off_the_counter():
    colls = H.collectives(TPU_LOOP, axis_map=AxisMap(("stage", "data"), (2, 2)))
    assert [(c.kind, c.axis, c.bytes, c.is_async) for c in colls] == [
        ("collective-permute", "stage", 32, True), ("all-reduce", "data", 32, False)]
    assert all(c.loops == [("w", 5)] and c.per_step_count == 5 for c in colls)  # from 2 while < 7, +1


BRANCHES = """HloModule m, num_partitions=4

%update (p: (s32[], f32[64], pred[])) -> (s32[], f32[64], pred[]) {
  %p = (s32[], f32[64], pred[]) parameter(0)
  %c = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%c, %one)
  %g = f32[64] get-tuple-element(%p), index=1
  %ar = f32[64] all-reduce(%g), channel_id=1, replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add
  %f = pred[] get-tuple-element(%p), index=2
  ROOT %t = (s32[], f32[64], pred[]) tuple(%next, %ar, %f)
}

%once (q: (s32[], f32[64], pred[])) -> pred[] {
  %q = (s32[], f32[64], pred[]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %flag = pred[] get-tuple-element(%q), index=2
  %n = s32[] convert(%flag)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%update2 (p2: (s32[], f32[16], pred[])) -> (s32[], f32[16], pred[]) {
  %p2 = (s32[], f32[16], pred[]) parameter(0)
  %c2 = s32[] get-tuple-element(%p2), index=0
  %one2 = s32[] constant(1)
  %next2 = s32[] add(%c2, %one2)
  %g2 = f32[16] get-tuple-element(%p2), index=1
  %ar2 = f32[16] all-reduce(%g2), channel_id=2, replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add
  %f2 = pred[] get-tuple-element(%p2), index=2
  ROOT %t2 = (s32[], f32[16], pred[]) tuple(%next2, %ar2, %f2)
}

%clock (p: (s32[], f32[64], f32[16], pred[], pred[])) -> (s32[], f32[64], f32[16], pred[], pred[]) {
  %p = (s32[], f32[64], f32[16], pred[], pred[]) parameter(0)
  %c = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%c, %one)
  %zero = s32[] constant(0)
  %a = f32[64] get-tuple-element(%p), index=1
  %b = f32[16] get-tuple-element(%p), index=2
  %fa = pred[] get-tuple-element(%p), index=3
  %fb = pred[] get-tuple-element(%p), index=4
  %ia = (s32[], f32[64], pred[]) tuple(%zero, %a, %fa)
  %wa = (s32[], f32[64], pred[]) while(%ia), condition=%once, body=%update
  %ib = (s32[], f32[16], pred[]) tuple(%zero, %b, %fb)
  %wb = (s32[], f32[16], pred[]) while(%ib), condition=%once2, body=%update2
  %ra = f32[64] get-tuple-element(%wa), index=1
  %rb = f32[16] get-tuple-element(%wb), index=1
  ROOT %t = (s32[], f32[64], f32[16], pred[], pred[]) tuple(%next, %ra, %rb, %fa, %fb)
}

%once2 (q2: (s32[], f32[16], pred[])) -> pred[] {
  %q2 = (s32[], f32[16], pred[]) parameter(0)
  %i2 = s32[] get-tuple-element(%q2), index=0
  %flag2 = pred[] get-tuple-element(%q2), index=2
  %n2 = s32[] convert(%flag2)
  ROOT %lt2 = pred[] compare(%i2, %n2), direction=LT
}

%clocks (q: (s32[], f32[64], f32[16], pred[], pred[])) -> pred[] {
  %q = (s32[], f32[64], f32[16], pred[], pred[]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[64], b: f32[16], fa: pred[], fb: pred[]) -> f32[64] {
  %a = f32[64] parameter(0)
  %b = f32[16] parameter(1)
  %fa = pred[] parameter(2)
  %fb = pred[] parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64], f32[16], pred[], pred[]) tuple(%zero, %a, %b, %fa, %fb)
  %w = (s32[], f32[64], f32[16], pred[], pred[]) while(%init), condition=%clocks, body=%clock
  ROOT %out = f32[64] get-tuple-element(%w), index=1
}
"""


def test_collectives_in_each_stages_update_branch_count_once_per_device():
    """Two 0-or-1-trip loops in a 6-clock loop, each all-reducing its stage's gradient over data:
    a device runs only its own stage's, so the largest branch is what one device moves."""
    colls = H.collectives(BRANCHES, axis_map=AxisMap(("stage", "data"), (2, 2)))
    assert sorted((c.bytes, c.scope, c.per_step_count) for c in colls) == [
        (64, "per clock, one branch", 6), (256, "per clock, one branch", 6)]
    assert H.bytes_per_axis(colls) == {"data": 6 * 256}  # the larger branch, at every clock at most
    (row,) = H.summarize(colls)
    assert (row["count"], row["bytes"], row["branches"], row["per_step_bytes"]) == (1, 256, 2, 6 * 256)
    assert row["trip_counts"] == [6, "0-1"] and "one branch: in one of 2 loops" in H.format_table([row])


def tpu(name):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'lpjax[tpu]')")
    return T.describe(name)


def test_a_v5e_2x2_compile_sends_stage_messages_one_hop():
    topo = tpu("v5e:2x2")
    mesh = Mesh(torus.place(topo.devices, 2, 2, wrap=topo.wrap).devices, ("stage", "data"))
    colls = H.collectives(pipeline(mesh).as_text(), mesh, wrap=topo.wrap)
    perm, _ = check_pipeline(colls)
    assert perm.pair_hops and max(perm.pair_hops) == 1
    assert all(h == 1 for p in H.hop_pairs(colls) for _, _, h in p["pairs"])


def test_two_slices_split_into_ici_collectives_and_dcn_transfers():
    topo = tpu("2xv4:2x2x2")
    mesh = Mesh(torus.place(topo.devices, 4, 4, wrap=topo.wrap).devices, ("stage", "data"))  # 2 stages a slice
    colls = H.collectives(pipeline(mesh).as_text(), mesh, wrap=topo.wrap)
    dcn = [c for c in colls if c.dcn]
    assert any(c.kind == "collective-permute" and c.axis == "stage" and c.loops for c in dcn)
    ici = [c for c in colls if c.kind == "collective-permute" and not c.dcn]
    assert ici and ici[0].axis == "stage" and max(ici[0].pair_hops) == 1
    pmean = next(c for c in colls if c.kind == "all-reduce" and c.loops and not c.dcn)
    assert pmean.axis == "data"  # the data axis stays inside a slice
    assert any("(dcn)" in r["kind"] for r in H.summarize(colls))
