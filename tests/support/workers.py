"""Start a multi-process test's worker processes and collect their output (not part of the product)."""

import subprocess
import sys


def run_workers(script, argv_of, count, env, timeout):
    """Run ``python script *argv_of(pid)`` for pid 0..count-1 at once; their outputs, in pid order.

    Fails the test with the tail of a worker's output when one exits non-zero; kills them all on a
    timeout or any other failure, so no worker outlives the test."""
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, argv_of(pid))], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(count)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs
