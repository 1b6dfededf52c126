"""Run many ``lpjax`` command lines, each in its own forked process, paying the import once.

Usage: ``python tests/support/cli_forks.py CASES.json`` where the file holds ``[[cwd, [args...]], ...]``; it
prints ``[[returncode, stdout, stderr], ...]`` as JSON.

Each command runs as a user's ``lpjax ...`` does: in its own process, through ``lpjax.cli.main``
with ``sys.argv`` set, its exit status and its own stdout/stderr file descriptors, so a traceback or a
stray line written by anything below the CLI shows up. Only Python's start and the imports are
shared: the parent imports ``lpjax.cli`` (JAX, flax, optax, orbax) and scikit-learn's datasets
before it forks, with no thread and no JAX backend started yet, so forking is safe; each child
starts its own backend if it needs one. Importing once instead of per command saves about 2.5
CPU-seconds a command.
"""

import atexit
import json
import os
import sys
import tempfile
import threading


def run_one(cwd, args):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 70  # if anything below escapes, the child still ends here and says so on stderr
            try:
                os.chdir(cwd)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.argv = ["lpjax", *args]
                from lpjax.cli import main

                try:
                    code = main()
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                atexit._run_exitfuncs()  # what the interpreter does at a normal exit
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return [os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()]


def main(path):
    import lpjax.cli  # noqa: F401  (the shared imports every child inherits)
    import sklearn.datasets  # noqa: F401  (the digits loader's; 2.5 s of each command on digits)

    assert threading.active_count() == 1, "a thread was started before forking: " + repr(threading.enumerate())
    cases = json.loads(open(path).read())
    sys.stdout.flush()  # anything the imports buffered would otherwise be written again by every child
    print(json.dumps([run_one(cwd, args) for cwd, args in cases]))


if __name__ == "__main__":
    main(sys.argv[1])
