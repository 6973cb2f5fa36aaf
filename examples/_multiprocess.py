"""Starts N local JAX processes (a multi-controller run on one machine), bounded in time.

``launch`` runs ``python <script> <args>`` N times, once per process id, each
with its own host CPU devices (``--xla_force_host_platform_device_count``),
``JAX_PLATFORMS=cpu`` and the coordinator's address in the environment:

- ``JAXNORM_COORDINATOR``: ``127.0.0.1:<free port>``;
- ``JAXNORM_NUM_PROCESSES``, ``JAXNORM_PROCESS_ID``.

The script calls ``jax.distributed.initialize`` with them (see
:func:`initialize`), which makes ``jax.devices()`` the devices of every
process; JAX's CPU collectives (gloo over TCP on localhost) carry the
all-reduces between processes.

Nothing waits without a limit. ``jax.distributed.initialize`` gets finite
initialization, heartbeat and shutdown timeouts; the launcher polls its
children against one deadline, and the moment one child exits with an error
(or the deadline passes) it kills every child's whole process group and raises
:class:`LaunchError` with the tail of each child's log. A child that fails
should exit at once with ``os._exit`` (:func:`run_worker` does): a plain exit
would wait in JAX's shutdown barrier for peers that never arrive.

Used by ``examples/data_parallel.py --processes N`` and by
``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# Seconds; generous because the machines that run the tests may be busy.
INITIALIZATION_TIMEOUT = 90
HEARTBEAT_TIMEOUT = 30
SHUTDOWN_TIMEOUT = 30


class LaunchError(RuntimeError):
    """A child process failed or the run passed its deadline; the message holds the logs' tails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the coordinator binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, local_devices: int, coordinator: str) -> dict[str, str]:
    """The environment of one child: its own device count (any inherited one removed), CPU, coordinator."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={local_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXNORM_COORDINATOR"] = coordinator
    env["JAXNORM_NUM_PROCESSES"] = str(num_processes)
    env["JAXNORM_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def initialize() -> tuple[int, int]:
    """``jax.distributed.initialize`` from the launcher's environment, gloo collectives, finite timeouts.

    Returns (process_id, num_processes). Call it before any other JAX call.
    """
    import jax

    process_id = int(os.environ["JAXNORM_PROCESS_ID"])
    num_processes = int(os.environ["JAXNORM_NUM_PROCESSES"])
    # [guide]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only: GPUs use NCCL, TPUs their ICI
    jax.distributed.initialize(
        coordinator_address=os.environ["JAXNORM_COORDINATOR"],
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=INITIALIZATION_TIMEOUT,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT,
    )
    # [/guide]
    return process_id, num_processes


def run_worker(main: Callable[[], None]) -> None:
    """Runs ``main()`` in a child; on any exception prints it and leaves at once (exit code 1).

    ``os._exit`` skips JAX's shutdown barrier, which would otherwise wait for
    the other processes; the launcher sees the exit code and kills them.
    """
    try:
        main()
    except BaseException:  # noqa: B036  (SystemExit and KeyboardInterrupt too: never block in shutdown)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    import jax

    jax.distributed.shutdown()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _kill(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the child and anything it started
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def launch(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    num_processes: int,
    local_devices: int,
    log_dir: str | Path,
    timeout: float = 240.0,
) -> float:
    """Runs ``python script *args`` as ``num_processes`` processes of one JAX job; returns the wall seconds.

    Each child logs stdout and stderr to ``<log_dir>/process_<i>.log``.

    Raises:
      LaunchError: a child exited with a non-zero code (every other child is
        then killed at once), or ``timeout`` seconds passed (all are killed).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    procs, logs, files = [], [], []
    start = time.monotonic()
    try:
        for i in range(num_processes):
            logs.append(log_dir / f"process_{i}.log")
            files.append(open(logs[-1], "w"))  # noqa: SIM115  (closed in finally)
            procs.append(subprocess.Popen(
                [sys.executable, str(script), *args], env=child_env(i, num_processes, local_devices, coordinator),
                stdout=files[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            ))
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            late = time.monotonic() - start > timeout
            if failed or late:
                _kill(procs)
                why = (f"process {failed[0]} exited with code {codes[failed[0]]}" if failed
                       else f"the run passed its {timeout:.0f} s deadline")
                tails = "\n".join(f"--- process {i} ({logs[i]}):\n{_tail(logs[i])}" for i in range(num_processes))
                raise LaunchError(f"{num_processes} processes of {Path(script).name}: {why}; every process killed.\n"
                                  f"{tails}")
            if all(c == 0 for c in codes):
                return time.monotonic() - start
            time.sleep(0.1)
    finally:
        _kill(procs)
        for f in files:
            f.close()
