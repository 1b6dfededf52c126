"""Per-device memory against HBM (lpjax/distributed/memory_report.py), from a program compiled for the
host's CPU and, where libtpu is installed, from deviceless v5e compiles that fit and that do not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from lpjax.distributed import memory_report as M
from lpjax.executors import topology as T

T.quiet_libtpu_env()
GiB = 2 ** 30


def test_a_cpu_compile_reports_its_argument_output_and_peak_bytes():
    compiled = jax.jit(lambda a, b: (a @ b).sum(0)).lower(
        jax.ShapeDtypeStruct((256, 128), jnp.float32), jax.ShapeDtypeStruct((128, 64), jnp.float32)).compile()
    report = M.memory_report(compiled, "step", hbm=None, compile_seconds=0.5)
    assert report.argument == (256 * 128 + 128 * 64) * 4 and report.output == 64 * 4
    assert report.peak_source == "peak_memory_in_bytes" and report.peak >= report.argument
    assert report.fits is None and report.headroom is None  # no HBM figure for a CPU
    assert {"argument", "output", "temp", "generated_code", "alias", "peak", "fits", "headroom"} <= set(report.as_dict())
    assert "step" in M.format_table([report]) and '"memory"' in M.to_json([report])


def test_without_a_peak_figure_the_peak_is_computed_and_marked():
    stats = {"argument_size_in_bytes": 100, "output_size_in_bytes": 50, "alias_size_in_bytes": 30,
             "temp_size_in_bytes": 20, "generated_code_size_in_bytes": 7}  # what a jaxlib without the peak gives
    report = M.from_stats(stats, "old", hbm=150)
    assert report.peak == 140 and report.peak_source == "computed" and report.needed == 147
    assert report.fits and report.headroom == 3 and "*" in M.format_table([report])
    short = M.from_stats(stats, "old", hbm=140)
    assert short.fits is False and short.shortfall_line().startswith("old does not fit: needs")


def test_the_compilers_out_of_memory_error_becomes_a_failing_report():
    err = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
                       "required for HLO temporaries (30.00G) exceeds available HBM (15.75G). HLO module: jit_f.\nmore")
    assert M.is_oom(err)
    report = M.from_oom_error(err, "train_step")
    assert report.fits is False and report.hbm == int(15.75 * GiB) and report.needed == 30 * GiB
    assert report.shortfall_line() == ("train_step does not fit: needs 30.00 GiB per device, HBM has 15.75 GiB "
                                       "(short by 14.25 GiB)")
    assert "\n" not in report.error


def test_a_v5e_chip_fits_4_gib_and_refuses_20():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'lpjax[tpu]')")
    topo = T.describe("v5e:1x1")
    mesh = Mesh(np.array(topo.devices), ("x",))

    def compile_(gib):
        x = jax.ShapeDtypeStruct((int(gib * GiB) // 4,), jnp.float32, sharding=NamedSharding(mesh, jax.P()))
        return jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()

    report = M.memory_report(compile_(4), "small", topo.hbm_bytes)
    assert report.fits and report.alias == report.output == 4 * GiB  # the donated argument holds the output
    with pytest.raises(Exception) as err:
        compile_(20)
    assert M.is_oom(err.value)
    failing = M.from_oom_error(err.value, "big", topo.hbm_bytes)
    assert failing.fits is False and failing.hbm == topo.hbm_bytes
