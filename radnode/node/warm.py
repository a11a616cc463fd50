"""Warm job start: a pre-imported process per pipeline, waiting for exactly one job, which it runs and exits.

A cold job process spends 2–3 s (on 2 cores) starting the interpreter and importing Holoscan, highdicom and
the app before it reads a file. The scheduler keeps one spare process per pipeline that the routing rules
run in-process; the spare has done those imports and blocks on its stdin. A job is handed to it as one JSON
line (the argv after ``python -m radnode``, the environment, the working directory and the log files), and
the scheduler starts the next spare once no job is running (its imports would take CPU from the job).

Isolation is the cold path's: each process is the scheduler's own child, started with ``start_new_session``
and the parent-death signal, runs one job only and exits, so its hard timeout kills its process group as
before, and a crash, a leak or a changed global in one job never reaches the next. The spare is started
with the environment the job would get, less what the executor adds per job (``HOLOSCAN_MODEL_PATH``, read
when the app runs); a job whose environment differs otherwise is started cold.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from radnode.execution import REISSUE_ENV

log = logging.getLogger(__name__)

RADNODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "radnode")
"""What a job command must start with to run in a warm process (the rest are ``radnode`` arguments)."""
PER_JOB_VARIABLES = frozenset({"HOLOSCAN_MODEL_PATH", REISSUE_ENV})
"""Environment a job may add to the spare's: read by the app when it runs, not by the imports."""
READY = "warm process ready:"
"""How a spare's line in ``jobs/warm/<pipeline>.log`` starts once its imports are done (with its pid)."""
_PR_SET_PDEATHSIG = 1


_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """In a job process before exec, warm or cold: get SIGKILL when the thread that started it (the scheduler)
    ends, so no job process outlives a crashed node and runs on beside the re-run after a restart."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WarmPool:
    """One spare job process per pipeline, replaced as soon as it is taken. Only the scheduler's thread may
    call it: the spares die with the thread that started them."""

    def __init__(self, pipelines: Iterable[str], env: Mapping[str, str], data_dir: Path) -> None:
        self.pipelines = sorted(set(pipelines))
        self.env = dict(env)
        self.data_dir = data_dir
        self._spares: dict[str, subprocess.Popen] = {}
        self._started: set[str] = set()
        """Pipelines with a spare started in this node's run: their log is appended to, not started afresh."""

    def fill(self) -> None:
        """Start a spare for every pipeline that has none. One whose spare died waiting (an app that does not
        import, say) is logged and left cold until the node restarts: its jobs then report the error."""
        for pipeline in list(self.pipelines):
            spare = self._spares.get(pipeline)
            if spare is None:
                self._spares[pipeline] = self._spawn(pipeline)
            elif spare.poll() is not None:
                del self._spares[pipeline]
                self.pipelines.remove(pipeline)
                log.error("warm process for %s exited with status %s before it got a job (see %s); its jobs "
                          "start cold", pipeline, spare.returncode, self._log_file(pipeline))

    def claim(self, pipeline: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen | None:
        """The pipeline's spare, taken out of the pool for the job ``argv`` (a new one is started in its place
        by the next :meth:`fill`); None when the job cannot run warm (another command, another environment, no
        live spare): the caller starts it cold."""
        spare = self._spares.get(pipeline)
        if (spare is None or spare.poll() is not None or tuple(argv[:len(RADNODE_COMMAND)]) != RADNODE_COMMAND
                or {k: v for k, v in env.items() if k not in PER_JOB_VARIABLES} != self.env):
            return None
        return self._spares.pop(pipeline)

    def give_back(self, pipeline: str, spare: subprocess.Popen) -> None:
        """A claimed spare whose job did not start after all: it waits for the next one."""
        if pipeline in self._spares:
            _end(spare)
        else:
            self._spares[pipeline] = spare

    @staticmethod
    def hand(spare: subprocess.Popen, argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: Path,
             stderr: Path) -> None:
        """Give a claimed spare its job (``argv`` a ``python -m radnode`` command); OSError when it has died."""
        job = {"args": list(argv[len(RADNODE_COMMAND):]), "env": dict(env), "cwd": str(cwd),
               "stdout": str(stdout), "stderr": str(stderr)}
        assert spare.stdin is not None
        try:
            spare.stdin.write(json.dumps(job).encode() + b"\n")
            spare.stdin.close()
        except OSError:
            _end(spare)
            raise

    def close(self) -> None:
        """End the spares (they hold no job)."""
        for spare in self._spares.values():
            _end(spare)
        self._spares.clear()

    def _log_file(self, pipeline: str) -> Path:
        return warm_log(self.data_dir, pipeline)

    def _spawn(self, pipeline: str) -> subprocess.Popen:
        self._log_file(pipeline).parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_file(pipeline), "ab" if pipeline in self._started else "wb") as err:
            self._started.add(pipeline)
            return subprocess.Popen([*RADNODE_COMMAND[:2], __name__, pipeline], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err, env=self.env, start_new_session=True,
                                    preexec_fn=die_with_parent)


def warm_log(data_dir: Path, pipeline: str) -> Path:
    """Where a pipeline's spares write until they get a job (import errors, the :data:`READY` lines)."""
    return data_dir / "jobs" / "warm" / f"{pipeline}.log"


def _end(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, fd)
    os.close(target)


def serve_one(pipeline: str) -> int:
    """The spare's life: import what the pipeline's job needs, wait for one job on stdin, run it as ``radnode``
    would, exit with its status. End of input (the pool closed) ends it with status 0."""
    from radnode.cli import build_parser, main
    from radnode.execution import prepare_holoscan_process
    from radnode.pipelines.registry import get_pipeline

    prepare_holoscan_process()
    get_pipeline(pipeline).load_app_class()  # the imports a cold job pays for before it reads a file
    build_parser()  # and the command line's (its subcommands import what their choices list: ~0.5 s)
    print(f"{READY} {os.getpid()} {pipeline}", file=sys.stderr, flush=True)
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    job = json.loads(line)
    _redirect(1, job["stdout"])
    _redirect(2, job["stderr"])
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = [*RADNODE_COMMAND[2:], *job["args"]]
    return main(job["args"])


def exit_at_once(status: int | str | None) -> None:
    """End the job's process as soon as it is done: logs and standard streams flushed, then ``os._exit``, without
    the interpreter's teardown of the run's objects and of Holoscan (about a second on two busy cores, after the
    results are complete: every output is written through a temporary name and closed, the manifest last)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if isinstance(status, str):  # SystemExit("message"), as argparse and the CLI raise it
        print(status, file=sys.stderr, flush=True)
        status = 1
    os._exit(status or 0)


if __name__ == "__main__":
    try:
        exit_status: int | str | None = serve_one(sys.argv[1])
    except SystemExit as e:
        exit_status = e.code
    exit_at_once(exit_status)
