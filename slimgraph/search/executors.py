"""Where candidates are built and scored: in this process (`--jobs 1`), a local process pool
(`--jobs N`), or a Ray cluster (`--executor ray --address ...`). Every executor maps
`run_job` over a batch and returns the outcomes in order; latency is measured afterwards
by the driver, one candidate at a time, so workers never disturb a timing.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
from concurrent.futures import ProcessPoolExecutor

from slimgraph.errors import SlimgraphError
from slimgraph.search.candidate import Candidate
from slimgraph.search.evaluate import Outcome, Settings, run_job

logger = logging.getLogger("slimgraph.search")


class ExecutorError(SlimgraphError):
    """The requested executor cannot run (Ray missing or unreachable)."""

    exit_code = 2


class LocalExecutor:
    """`jobs` worker processes (spawned: no inherited ORT/torch thread pools); jobs=1 runs
    in this process."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ExecutorError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self._pool = None
        if jobs > 1:
            self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def map(self, settings: Settings, candidates: list[Candidate]) -> list[Outcome]:
        if self._pool is None:
            return [run_job(settings, c) for c in candidates]
        return list(self._pool.map(run_job, [settings] * len(candidates), candidates))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks (one CPU each). Uses the Ray instance already initialised in this process,
    or connects to `address` ("auto", "HOST:PORT" or "ray://HOST:PORT")."""

    name = "ray"

    def __init__(self, address: str | None = None, jobs: int = 1):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray: Ray is not installed (pip install 'slimgraph[ray]'); "
                                "or run with --executor local, or add --fallback-local") from None
        self.ray = ray
        self.jobs = jobs
        self._owned = False
        if not ray.is_initialized():
            if address is None:
                raise ExecutorError("--executor ray needs --address (HOST:PORT, ray://HOST:PORT or auto) "
                                    "when no Ray instance runs in this process")
            _check_reachable(address)
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ExecutorError(f"--executor ray: cannot connect to the Ray cluster at {address!r}: "
                                    f"{str(e).splitlines()[0]}; check the address, or add --fallback-local") from None
            self._owned = True
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_job)

    def map(self, settings: Settings, candidates: list[Candidate]) -> list[Outcome]:
        refs = [self._task.remote(settings, c) for c in candidates]
        return list(self.ray.get(refs))

    def close(self) -> None:
        if self._owned:
            self.ray.shutdown()


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast on a HOST:PORT nobody listens at (Ray itself retries for a long time)."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--address {address!r}: write HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ExecutorError(f"--executor ray: nothing answers at {address!r} ({e.strerror or e}); start the "
                            "cluster (ray start --head) or fix --address, or add --fallback-local") from None


def make_executor(kind: str, *, jobs: int = 1, address: str | None = None,
                  fallback_local: bool = False) -> tuple[LocalExecutor | RayExecutor, str | None]:
    """The executor, and a note when Ray could not be used and the user allowed the local
    fallback."""
    if kind == "local":
        return LocalExecutor(jobs), None
    if kind != "ray":
        raise ExecutorError(f"--executor {kind!r}: choose local or ray")
    try:
        return RayExecutor(address, jobs), None
    except ExecutorError as e:
        if not fallback_local:
            raise
        note = f"Ray unavailable, ran locally instead (--fallback-local): {e}"
        logger.warning(note)
        return LocalExecutor(jobs), note
