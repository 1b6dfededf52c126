"""Topology names, HBM, and a (stage, data) mesh that follows the torus (lpjax/executors/topology.py,
torus.py, placement.make_stage_mesh). The parts that need libtpu's compile-only devices are skipped
where libtpu is not installed (pip install 'lpjax[tpu]'); the rest run on the host's CPU devices."""

import importlib.util

import jax
import numpy as np
import pytest

from lpjax.errors import ConfigError
from lpjax.executors import topology as T
from lpjax.executors import torus
from lpjax.executors.placement import make_stage_mesh

T.quiet_libtpu_env()  # before libtpu loads: no TPU-VM warnings, and xdist workers may load it side by side


def tpu(name):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'lpjax[tpu]')")
    return T.describe(name)


@pytest.mark.parametrize("text, kind, shape, slices", [
    ("v5e:4x4", "v5e", (4, 4), 1), ("V5E:16x16", "v5e", (16, 16), 1), ("v5p:4x4x4", "v5p", (4, 4, 4), 1),
    ("v5:4x4x4", "v5p", (4, 4, 4), 1), ("v4:4x4x4", "v4", (4, 4, 4), 1), ("2xv4:4x4x4", "v4", (4, 4, 4), 2),
    ("v6e:2x4", "v6e", (2, 4), 1), ("v5litepod:2x2", "v5e", (2, 2), 1), ("v4:2x2", "v4", (2, 2, 1), 1),
])
def test_a_topology_name_gives_its_chip_kind_shape_and_slices(text, kind, shape, slices):
    spec = T.parse_topology(text)
    assert (spec.chip.name, spec.shape, spec.num_slices) == (kind, shape, slices)


def test_slices_can_be_given_by_prefix_or_by_count_and_must_agree():
    spec = T.parse_topology("v4:4x4x4", num_slices=2)
    assert spec.num_slices == 2 and str(spec) == "2xv4:4x4x4" and spec.name == "v4:4x4x4"
    assert T.parse_topology("2xv4:4x4x4", num_slices=2).num_slices == 2
    with pytest.raises(ConfigError, match="2 slices but num_slices=3"):
        T.parse_topology("2xv4:4x4x4", num_slices=3)


@pytest.mark.parametrize("text, words", [
    ("v9:2x2", "unknown TPU kind"), ("v5e-16", "cloud accelerator name"), ("banana", "unknown topology"),
    ("v5e:4x4x4", "2 axes"), ("v5e:32x32", "at most 16x16"), ("v5e:3x3", "multiple of"), ("", "unknown topology"),
])
def test_a_bad_topology_name_is_one_line_naming_the_form(text, words):
    with pytest.raises(ConfigError) as err:
        T.parse_topology(text)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_wraparound_hosts_and_hbm_follow_the_chip_tables():
    assert T.parse_topology("v5e:4x4").wrap == (False, False, False)
    assert T.parse_topology("v5e:16x16").wrap == (True, True, False)
    assert T.parse_topology("v5e:8x16").wrap == (False, True, False)
    assert T.parse_topology("v4:4x4x4").wrap == (True, True, True)
    assert T.parse_topology("v5p:2x4x4").wrap == (False, False, False)
    assert T.parse_topology("v5e:2x4").chips_per_host_bounds == (2, 4, 1)
    assert T.parse_topology("v5e:4x4").chips_per_host_bounds == (2, 2, 1)
    assert T.parse_topology("v5e:16x16").hosts == 64
    gib = 2 ** 30
    assert {k: c.hbm_bytes // gib for k, c in T.CHIPS.items()} == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "tpu7x": 192}
    assert T.parse_topology("v5e:4x4").hbm_bytes == int(15.75 * gib)
    assert T.parse_topology("tpu7x:2x2x2").hbm_bytes == 96 * gib  # nominal, per core (2 cores a chip)


def test_without_libtpu_describe_names_the_extra_that_installs_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"pip install 'lpjax\[tpu\]'"):
        T.describe("v5e:4x4")


def test_the_quiet_environment_keeps_what_is_already_set():
    env = {"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}
    set_now = T.quiet_libtpu_env(env)
    assert env["TPU_WORKER_HOSTNAMES"] == "10.0.0.1,10.0.0.2" and "TPU_WORKER_HOSTNAMES" not in set_now
    assert env["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1" and set_now["JAX_PLATFORMS"] == "cpu"


def test_the_snake_visits_every_position_one_step_at_a_time():
    for shape in [(4,), (2, 4), (2, 2, 2), (4, 4, 4), (3, 1, 2)]:
        path = torus.snake(shape)
        assert len(set(path)) == int(np.prod(shape))
        assert all(sum(abs(a - b) for a, b in zip(p, q)) == 1 for p, q in zip(path, path[1:]))


def test_cpu_devices_keep_their_order_in_the_stage_mesh():
    devices = jax.devices()[:4]
    placement = torus.place(devices, 2, 2)
    assert placement.method == "order" and placement.stage_hops["max_hops"] is None
    mesh = make_stage_mesh(2, 2, devices)
    assert mesh.axis_names == ("stage", "data") and [d.id for d in mesh.devices.flat] == [d.id for d in devices]
    assert [d.id for d in make_stage_mesh(2, 2).devices.flat] == [d.id for d in jax.devices()[:4]]


def test_a_layout_that_does_not_use_every_device_names_the_ones_that_do():
    with pytest.raises(ConfigError, match="layouts that fit: 1x4, 2x2, 4x1"):
        torus.place(jax.devices()[:4], 3, 1)


def test_the_host_cpu_is_a_compile_target():
    target = T.describe("cpu")
    assert target.hbm_bytes is None and target.devices == jax.devices("cpu") and target.num_slices == 1


def test_the_slice_axis_is_the_one_that_sends_fewer_bytes():
    assert torus.choose_slice_axis() == "stage"
    assert torus.choose_slice_axis({"stage": 10, "data": 5}) == "data"
    assert torus.choose_slice_axis({"stage": 5, "data": 5}) == "stage"


@pytest.mark.parametrize("name, stages, data", [
    ("v5e:4x4", 4, 4), ("v5e:4x4", 16, 1), ("v5e:4x4", 8, 2), ("v5e:16x16", 16, 16), ("v5e:16x16", 32, 8),
    ("v5p:4x4x4", 8, 8), ("v5p:4x4x4", 16, 4), ("tpu7x:2x2x2", 4, 4),
])
def test_stage_neighbours_sit_on_neighbouring_chips(name, stages, data):
    topo = tpu(name)
    placement = torus.place(topo.devices, stages, data, wrap=topo.wrap)
    assert placement.stage_hops["max_hops"] <= 1 and placement.stage_hops["non_neighbour_pairs"] == 0
    assert sorted(d.id for d in placement.devices.flat) == sorted(d.id for d in topo.devices)
    assert placement.naive_stage_hops["max_hops"] >= placement.stage_hops["max_hops"]
    mesh = make_stage_mesh(stages, data, topo.devices)  # the executors' mesh is that placement
    assert (mesh.devices == placement.devices).all()


def test_v5e_4x4_data_groups_are_compact_boxes():
    topo = tpu("v5e:4x4")
    mesh = make_stage_mesh(4, 4, topo.devices)
    for row in mesh.devices:  # each stage's 4 data devices: a 2x2 box or a line, never spread apart
        xs, ys = {d.coords[0] for d in row}, {d.coords[1] for d in row}
        assert (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1) == 4


def test_v5p_8x8_is_placed_where_mesh_utils_and_make_mesh_refuse():
    from jax.experimental import mesh_utils

    topo = tpu("v5p:4x4x4")
    with pytest.raises(NotImplementedError):
        mesh_utils.create_device_mesh((8, 8), topo.devices)
    placement = torus.place(topo.devices, 8, 8, wrap=topo.wrap)
    assert placement.method == "snake" and placement.stage_hops["max_hops"] == 1
    assert torus.hop_summary(torus.stage_hops(make_stage_mesh(8, 8, topo.devices).devices, topo.wrap))["max_hops"] == 1


def test_a_layout_that_cannot_be_placed_is_a_config_error_naming_the_layouts_that_fit():
    topo = tpu("v5e:4x4")
    with pytest.raises(ConfigError, match="layouts that use them all: 1x16, 2x8, 4x4, 8x2, 16x1"):
        make_stage_mesh(3, 5, topo.devices)  # 15 chips of 16 are no box, and jax.make_mesh refuses them
    assert make_stage_mesh(2, 2, topo.devices).devices.shape == (2, 2)  # the first 4 devices are a 2x2 box


def test_describe_counts_devices_and_hosts():
    topo = tpu("v5e:16x16")
    assert len(topo.devices) == 256 and len({d.process_index for d in topo.devices}) == 64
    assert T.hbm_bytes_for(topo.devices[0]) == T.CHIPS["v5e"].usable_hbm_bytes
    assert torus.wrap_of(topo.devices) == (True, True, False)


def test_several_slices_go_on_the_stage_axis_unless_told():
    topo = tpu("2xv4:4x4x4")
    assert len(topo.devices) == 128
    placement = torus.place(topo.devices, 8, 16, wrap=topo.wrap)
    slices = np.vectorize(lambda d: d.slice_index)(placement.devices)
    assert (slices[:4] == 0).all() and (slices[4:] == 1).all()
    assert placement.stage_hops["dcn_pairs"] == 16 and placement.stage_hops["max_hops"] == 1
    on_data = torus.place(topo.devices, 8, 16, wrap=topo.wrap, slices_on="data")
    assert (np.vectorize(lambda d: d.slice_index)(on_data.devices)[:, :8] == 0).all()
    with pytest.raises(ConfigError, match="stage divisible by 2"):
        torus.place(topo.devices, 1, 128)
