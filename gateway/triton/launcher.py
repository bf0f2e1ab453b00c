"""The embedded ``tritonserver``: start it, keep it alive, stop it without leaving anything behind.

When ``triton.url`` is unset (``PALM_TRITON__URL``, or its alias ``PALM_TRITON_URL``) the service runs
the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles (python backend only;
``palm/1/model.py`` runs the ONNX on onnxruntime). :class:`EmbeddedTriton` owns that child process:

* **ports**: gRPC, HTTP and metrics listen on free loopback ports picked at start and kept across
  restarts, so a client built from :attr:`EmbeddedTriton.grpc_url` stays valid.
* **backends**: ``<data_dir>/triton/backends/python/`` links ``libtriton_python.so``, its utils module
  and the stub built for this interpreter; the child's ``PATH`` starts with this interpreter's ``bin``
  so the stub imports our numpy and onnxruntime.
* **instances**: with ``settings.instances`` set, the server gets a repository of its own under
  ``<state_dir>/repositories/<pid>-<token>/``: the model's files linked, and its config with that
  instance count (:func:`with_instances`). ``palm-serve predict`` asks for one instance on small inputs,
  where starting the second costs more than it gives back.
* **readiness**: :meth:`EmbeddedTriton.start` returns once ``/v2/models/<name>/versions/<v>/ready``
  answers 200, or raises :class:`~gateway.errors.InferenceUnavailable` after ``ready_timeout_s``.
* **supervision**: a daemon thread waits on the child; if it dies, the thread cleans up and respawns
  it after ``backoff_initial_s``, doubling up to ``backoff_max_s`` while restarts keep failing, and
  back to the initial delay once a server stayed up for ``stable_after_s``.
* **cleanup**: the child leads its own process group (the python backend's stubs inherit it) and, via
  ``setpriv --pdeathsig`` where util-linux has it, gets SIGTERM when the supervisor thread dies, even
  if this process is SIGKILLed (the stubs notice their parent is gone and exit). Stopping sends
  SIGKILL to the group at once: the gateway is the server's only client and stops it only once its
  own requests are over, and nothing of the server's state outlives it, so a graceful shutdown would
  only wait (tritonserver polls its models once a second while the python backend unloads, seconds
  in all). Then stragglers found by our unique shared-memory prefix are killed too. That prefix
  (``shm-region-prefix-name``) also names every
  ``/dev/shm/triton_python_backend_shm_region_palm_<pid>_<token>_*`` region of this server, so only
  ours are unlinked; other servers on the machine are left alone. The same goes for
  ``/dev/shm/palm_lanes_<pid>_<token>``, the table in which the model's instances mark themselves
  busy (``palm/1/model.py``; its name reaches them as ``$PALM_LANES_NAME``).

Sync code uses ``with EmbeddedTriton(...) as triton:``; async code ``async with`` (the blocking parts
run in a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from gateway.errors import InferenceUnavailable
from gateway.procfs import alive, processes_matching
from gateway.settings import TritonSettings
from gateway.triton.malloc import MALLOC_ENV

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
LANES_PREFIX = "palm_lanes_"

EXIT_TIMEOUT_S = 5
"""tritonserver's own shutdown budget, used when it gets SIGTERM because this process died."""
_LOG_TAIL_BYTES = 4000
_PORT_CLASH = "ddress already in use"


@dataclass(frozen=True, slots=True)
class TritonPorts:
    """Loopback ports of one embedded server."""

    grpc: int
    http: int
    metrics: int


@dataclass(frozen=True, slots=True)
class TritonDistribution:
    """Where the ``nvidia-pytriton`` wheel put the server, the python backend and the stubs."""

    binary: Path
    python_backend: Path
    stub: Path

    @classmethod
    def find(cls) -> TritonDistribution:
        """Locate the bundled ``tritonserver`` and the python-backend stub for this interpreter.

        Returns:
            The three paths the launcher needs.

        Raises:
            InferenceUnavailable: ``nvidia-pytriton`` is not installed, or lacks a stub for this Python.
        """
        # importlib, not import: the package's own imports need dependencies installed with --no-deps.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise InferenceUnavailable(
                "the embedded Triton needs the nvidia-pytriton wheel (pip install --no-deps "
                "nvidia-pytriton==0.7.0), or set PALM_TRITON_URL to a running server"
            )
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (dist.binary, dist.python_backend / "libtriton_python.so", dist.stub):
            if not path.exists():
                raise InferenceUnavailable(f"the nvidia-pytriton wheel is incomplete: {path} is missing")
        return dist


_INSTANCE_GROUP = re.compile(r"instance_group\s*\[\s*\{(?P<group>[^{}\[\]]*)\}\s*\]")
_COUNT = re.compile(r"\bcount\s*:\s*\d+")


def with_instances(config: str, instances: int) -> str:
    """A model config (``config.pbtxt`` text) with its one instance group running ``instances``
    instances; a config without ``instance_group`` gets one of the default kind.

    Raises:
        ValueError: the config has several instance groups (or one this reader cannot parse).
    """
    groups = list(_INSTANCE_GROUP.finditer(config))
    if not groups:
        if "instance_group" in config:
            raise ValueError("cannot read this config's instance_group to change its count")
        return f"{config.rstrip()}\ninstance_group [ {{ count: {instances} }} ]\n"
    if len(groups) > 1:
        raise ValueError("the config has several instance_group entries; set their counts there")
    group = groups[0]
    body = group["group"]
    if _COUNT.search(body):
        counted = _COUNT.sub(f"count: {instances}", body)
    else:
        counted = f" count: {instances} {body}"
    return config[: group.start("group")] + counted + config[group.end("group") :]


def free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free TCP ports on 127.0.0.1.

    All sockets are held open until every port is known, so the ports differ from each other. Another
    process may still take one before the server binds it; the launcher retries with fresh ports.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@functools.cache
def parent_death_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig TERM --`` if this system's ``setpriv`` supports it, else nothing.

    The kernel signals the child when the *thread* that spawned it exits, which is why the supervisor
    thread (alive exactly as long as the server should be) does all spawning. A wrapper instead of a
    ``preexec_fn``: Python then spawns without ``fork()``, which gRPC's threads in this process make
    unsafe.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    try:
        probe = subprocess.run(
            [setpriv, "--pdeathsig", "TERM", "--", "true"], capture_output=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return (setpriv, "--pdeathsig", "TERM", "--") if probe.returncode == 0 else ()


class EmbeddedTriton:
    """A supervised ``tritonserver`` child process serving one model on loopback ports.

    Example::

        with EmbeddedTriton(settings.triton, settings.data_dir / "triton") as triton:
            client = TritonClient(triton.grpc_url, settings.triton)

    Args:
        settings: Model name/version, repository, config name and ``ready_timeout_s``.
        state_dir: Where the server's files go (backend links, log); ``<data_dir>/triton`` normally.
        distribution: The server binary and python backend; found in the ``nvidia-pytriton`` wheel by
            default.
        backoff_initial_s: Delay before the first restart after a crash.
        backoff_max_s: Cap of the exponential restart delay.
        stable_after_s: Uptime after which the restart delay goes back to ``backoff_initial_s``.
        shm_byte_size: Initial and growth size of each python-backend shared-memory region; ``None``
            keeps the backend's 1 MiB (a larger size measured no gain: docs/performance.md, "Request
            encoding and malloc").
        tune_malloc: Pass ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` to the child.
        extra_args: More ``tritonserver`` flags, appended last.
        env: More environment variables for the child.
        on_restart: Called (from the supervisor thread) each time a crashed server is ready again,
            e.g. a Prometheus counter's ``inc``.
    """

    def __init__(
        self,
        settings: TritonSettings,
        state_dir: Path,
        *,
        distribution: TritonDistribution | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 60.0,
        shm_byte_size: int | None = None,
        tune_malloc: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        on_restart: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir).resolve()
        self._distribution = distribution
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.shm_byte_size = shm_byte_size
        self.tune_malloc = tune_malloc
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.on_restart = on_restart
        self._token = token = secrets.token_hex(4)
        self.shm_prefix = f"{SHM_PREFIX}palm_{os.getpid()}_{token}_"
        self.lanes_name = f"{LANES_PREFIX}{os.getpid()}_{token}"
        self.log_path = self.state_dir / "tritonserver.log"

        self._ports: TritonPorts | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._started = threading.Event()  # first start settled, successfully or not
        self._start_error: InferenceUnavailable | None = None
        self._restarts = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._repository: Path | None = None

    # -- public state -------------------------------------------------------------------------------

    @property
    def ports(self) -> TritonPorts:
        """The loopback ports; fixed once :meth:`start` returned."""
        if self._ports is None:
            raise RuntimeError("EmbeddedTriton.start() has not been called")
        return self._ports

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC endpoint, the form ``TritonClient`` takes."""
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of Triton's HTTP/REST endpoint."""
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:PORT/metrics``: Triton's Prometheus metrics."""
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of the current ``tritonserver``, ``None`` between restarts or when stopped."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def restarts(self) -> int:
        """How many times the supervisor brought a dead server back to ready."""
        return self._restarts

    @property
    def ready(self) -> bool:
        """Whether the model was ready at the last check (cleared as soon as the child exits)."""
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the server is ready (e.g. after a restart).

        Args:
            timeout_s: Upper bound in seconds; ``settings.ready_timeout_s`` when ``None``.

        Returns:
            ``True`` if ready, ``False`` on timeout or when stopped.
        """
        deadline = time.monotonic() + (self.settings.ready_timeout_s if timeout_s is None else timeout_s)
        while not self._stopping.is_set():
            if self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                return False
        return False

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the server and block until the model is ready; supervise it from then on.

        Raises:
            InferenceUnavailable: The binary is missing, or the model did not become ready within
                ``settings.ready_timeout_s`` (the message carries the end of the server's log).
            RuntimeError: Already started, or stopped already (a launcher runs once).
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("EmbeddedTriton is already started")
            if self._stopped:
                raise RuntimeError("EmbeddedTriton was stopped; create another to start a server again")
            if self._distribution is None:
                self._distribution = TritonDistribution.find()
            self._prepare_state_dir(self._distribution)
            self._stopping.clear()
            self._started.clear()
            self._start_error = None
            began = time.monotonic()
            self._thread = threading.Thread(
                target=self._supervise, name="tritonserver-supervisor", daemon=True
            )
            self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            error = self._start_error
            self._join()
            raise error
        logger.info(
            "tritonserver ready in %.2fs: model=%s grpc=%s metrics=%s pid=%s",
            time.monotonic() - began,
            self.settings.model_name,
            self.grpc_url,
            self.metrics_url,
            self.pid,
        )

    def stop(self) -> None:
        """Stop the server (SIGKILL to its process group, see the module docstring) and clean up.

        Idempotent. On return no process of ours and no shared-memory region of ours is left.
        """
        with self._lock:
            self._stopped = True
            self._stopping.set()
            self._join()
        self._kill_stragglers()
        self._unlink_shm()
        if self._repository is not None:
            shutil.rmtree(self._repository, ignore_errors=True)

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedTriton:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- supervisor thread --------------------------------------------------------------------------

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _supervise(self) -> None:
        """Thread body: first start, then wait/restart until stopped. Owns ``self._proc``."""
        try:
            try:
                self._first_start()
            except InferenceUnavailable as exc:
                self._start_error = exc
                return
            except BaseException as exc:  # never leave start() waiting forever
                self._start_error = InferenceUnavailable(f"embedded tritonserver failed to start: {exc!r}")
                raise
            finally:
                self._started.set()
            self._watch()
        finally:
            self._terminate()
            self._ready.clear()

    def _first_start(self) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        attempts = 0
        while True:
            attempts += 1
            grpc_port, http_port, metrics_port = free_ports(3)
            self._ports = TritonPorts(grpc=grpc_port, http=http_port, metrics=metrics_port)
            outcome = self._spawn_and_wait(deadline, truncate_log=attempts == 1)
            if outcome == "ready":
                return
            if outcome == "stopped":
                raise InferenceUnavailable("embedded tritonserver was stopped while starting")
            # A port taken between free_ports() and bind is worth another try with fresh ports; a model
            # that fails to load is not.
            port_clash = outcome == "exited" and _PORT_CLASH in self._log_tail()
            if not port_clash or attempts >= 3 or time.monotonic() >= deadline:
                raise InferenceUnavailable(
                    f"embedded tritonserver did not get model {self.settings.model_name!r} ready "
                    f"({outcome} after {attempts} attempt(s), ready_timeout_s="
                    f"{self.settings.ready_timeout_s:g}); log {self.log_path}:\n{self._log_tail()}"
                )
            self._terminate()

    def _watch(self) -> None:
        backoff = self.backoff_initial_s
        while True:
            proc = self._proc
            assert proc is not None
            up_since = time.monotonic()
            stubs = [pid for pid in processes_matching(self.shm_prefix) if pid != proc.pid]
            ticks = 0
            while proc.poll() is None:
                if self._stopping.wait(0.1):
                    return
                ticks += 1
                if ticks % 10 == 0 and self._stub_died(stubs):
                    # The python backend does not replace a dead stub: the model stays "ready" and
                    # every request fails. Only a new server recovers, so make this a crash.
                    self._ready.clear()
                    logger.warning("a python-backend stub of tritonserver pid=%s died; restarting", proc.pid)
                    self._terminate()
            self._ready.clear()
            uptime = time.monotonic() - up_since
            if uptime >= self.stable_after_s:
                backoff = self.backoff_initial_s
            logger.warning(
                "tritonserver pid=%s exited with %s after %.1fs; restarting in %.1fs. Log tail:\n%s",
                proc.pid,
                proc.returncode,
                uptime,
                backoff,
                self._log_tail(),
            )
            while True:
                self._terminate()  # reap stubs and shm of the dead incarnation
                if self._stopping.wait(backoff):
                    return
                outcome = self._spawn_and_wait(time.monotonic() + self.settings.ready_timeout_s)
                backoff = min(backoff * 2, self.backoff_max_s)
                if outcome == "stopped":
                    return
                if outcome == "ready":
                    self._restarts += 1
                    logger.info("tritonserver restarted: pid=%s restarts=%s", self.pid, self._restarts)
                    self._notify_restart()
                    break
                logger.warning("tritonserver restart failed (%s); next try in %.1fs", outcome, backoff)

    def _spawn_and_wait(self, deadline: float, *, truncate_log: bool = False) -> str:
        """Start one server and wait for the model; ``ready``, ``exited``, ``timeout`` or ``stopped``."""
        self._ready.clear()
        self._proc = self._spawn(truncate_log=truncate_log)
        s = self.settings
        url = f"{self.http_url}/v2/models/{s.model_name}/versions/{s.model_version}/ready"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        while True:
            if self._stopping.is_set():
                return "stopped"
            if self._proc.poll() is not None:
                return "exited"
            try:
                with opener.open(url, timeout=1.0) as response:
                    if response.status == 200:
                        self._ready.set()
                        return "ready"
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 400 while the model loads
            if time.monotonic() >= deadline:
                return "timeout"
            time.sleep(0.05)

    def _notify_restart(self) -> None:
        if self.on_restart is None:
            return
        try:
            self.on_restart()
        except Exception:  # a metrics hook must not take the supervisor down
            logger.exception("on_restart callback failed")

    def _spawn(self, *, truncate_log: bool) -> subprocess.Popen[bytes]:
        command = self._command()
        logger.debug("starting %s", " ".join(command))
        with open(self.log_path, "wb" if truncate_log else "ab") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self.state_dir,
                start_new_session=True,  # own process group: the stubs inherit it, killpg gets all
            )

    def _command(self) -> list[str]:
        assert self._distribution is not None
        assert self._ports is not None
        s = self.settings
        repository = self._repository or Path(s.model_repository).resolve()
        command = [
            *parent_death_prefix(),
            str(self._distribution.binary),
            f"--model-repository={repository}",
            f"--backend-directory={self.state_dir / 'backends'}",
            "--model-control-mode=explicit",
            f"--load-model={s.model_name}",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self._ports.grpc}",
            "--http-address=127.0.0.1",
            f"--http-port={self._ports.http}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self._ports.metrics}",
            "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.shm_byte_size is not None:
            command += [
                f"--backend-config=python,shm-default-byte-size={self.shm_byte_size}",
                f"--backend-config=python,shm-growth-byte-size={self.shm_byte_size}",
            ]
        if s.model_config_name and self._repository is None:
            command.append(f"--model-config-name={s.model_config_name}")
        command.extend(self.extra_args)
        return command

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The python backend runs the first python3 on PATH: ours, with numpy 2 and onnxruntime.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        if self.tune_malloc:
            # Big blocks stay on the child's heap: per-request tensors reuse pages instead of an
            # mmap/munmap and page faults each time. Measured gain: docs/performance.md, "Request
            # encoding and malloc".
            env.update(MALLOC_ENV)
        env["PALM_LANES_NAME"] = self.lanes_name
        env.update(self.extra_env)
        return env

    def _prepare_state_dir(self, dist: TritonDistribution) -> None:
        backend = self.state_dir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": dist.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": dist.python_backend / "triton_python_backend_utils.py",
            "triton_python_backend_stub": dist.stub,
        }
        for name, target in links.items():
            link = backend / name
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            # Atomic replace: two services sharing a data dir must never see a missing link.
            staging = backend / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
            staging.symlink_to(target)
            os.replace(staging, link)
        if self.settings.instances is not None and self._repository is None:
            self._repository = self._write_repository(self.settings.instances)

    def _write_repository(self, instances: int) -> Path:
        """A repository serving the configured model with ``instances`` instances (its own, removed at
        stop; those of processes that died are swept here)."""
        s = self.settings
        source = Path(s.model_repository).resolve() / s.model_name
        config = source / "configs" / f"{s.model_config_name}.pbtxt" if s.model_config_name else None
        if config is None or not config.is_file():
            config = source / "config.pbtxt"
        text = with_instances(config.read_text(), instances)
        parent = self.state_dir / "repositories"
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.iterdir():
            owner = stale.name.split("-", 1)[0]
            if owner.isdigit() and int(owner) != os.getpid() and not alive(int(owner)):
                shutil.rmtree(stale, ignore_errors=True)
        model = parent / f"{os.getpid()}-{self._token}" / s.model_name
        model.mkdir(parents=True)
        for entry in source.iterdir():
            if entry.name not in ("config.pbtxt", "configs"):
                (model / entry.name).symlink_to(entry)
        (model / "config.pbtxt").write_text(text)
        return model.parent

    # -- cleanup ------------------------------------------------------------------------------------

    def _terminate(self) -> None:
        """Stop the current incarnation: SIGKILL its process group (server and stubs), sweep the rest."""
        proc = self._proc
        if proc is not None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self._kill_stragglers()
        self._unlink_shm()

    def _stub_died(self, stubs: list[int]) -> bool:
        return any(not alive(pid) for pid in stubs)

    def _kill_stragglers(self) -> None:
        """SIGKILL any process of ours still alive (python-backend stubs outliving their server)."""
        for pid in processes_matching(self.shm_prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                logger.info("killed leftover tritonserver process pid=%s", pid)

    def _unlink_shm(self) -> None:
        if not SHM_DIR.is_dir():
            return
        for region in [*SHM_DIR.glob(f"{self.shm_prefix}*"), SHM_DIR / self.lanes_name]:
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
                logger.debug("removed shared-memory region %s", region.name)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
