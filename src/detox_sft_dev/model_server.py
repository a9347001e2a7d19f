"""The real caikit runtime (caikit-nlp's local text-generation module) on 127.0.0.1, as a subprocess.

It mirrors the cluster: KServe's storage initializer downloads the model from S3 into the models directory, then the
runtime serves every folder in it, the folder name being the model id. The runtime
runs in its own process group through a small launcher that applies the caikit shims of :mod:`.caikit_shims`
and :mod:`detox_sft.compat`
(``np.issubclass_`` on NumPy 2, binding to 127.0.0.1 instead of all interfaces, seeded sampling and greedy decoding as requested).

Python API (demo, notebooks, tests)::

    with LocalModelServer("runs/offline/export/caikit") as server:
        server.http_url      # http://127.0.0.1:<port>
        server.grpc_target   # 127.0.0.1:<port>

CLI: ``detox-sft-dev serve --models-dir DIR [--http-port P] [--grpc-port Q] [--from-s3 [PREFIX]] [--recipe R]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from detox_sft import compat
from detox_sft.config import ExportConfig
from detox_sft.storage import download_prefix
from detox_sft_dev import caikit_shims
from detox_sft_dev.s3 import free_port, port_in_use

__all__ = [
    "ServingError",
    "PortInUseError",
    "LocalModelServer",
    "model_ids",
    "download_model",
]

DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8085
LOCALHOST = "127.0.0.1"
_PARENT_ENV = "DETOX_SFT_SERVER_PARENT"
_HOST_ENV = "DETOX_SFT_SERVER_HOST"


class ServingError(RuntimeError):
    """The model server could not start or stopped unexpectedly; the message says what to do."""


class PortInUseError(ServingError):
    """A port the model server needs is already taken by another process."""


def model_ids(models_dir: str | os.PathLike[str]) -> list[str]:
    """The model ids the caikit runtime will serve from ``models_dir``: its sub-folders holding a ``config.yml``."""
    root = Path(models_dir)
    return sorted(p.name for p in root.iterdir() if (p / "config.yml").is_file()) if root.is_dir() else []


def download_model(prefix: str, models_dir: str | os.PathLike[str], model_id: str, **s3_kwargs: Any) -> Path:
    """Download a Caikit model directory from S3 into ``models_dir/model_id``, as KServe's storage initializer does.

    Args:
        prefix: S3 key prefix of the folder holding ``config.yml`` (``models/opt-350m-detox/caikit``).
        models_dir: the runtime's models directory.
        model_id: the served model id (the folder name).
        **s3_kwargs: passed to :func:`detox_sft.storage.download_prefix` (bucket, endpoint, credentials); by default
            the data-connection environment variables are used.

    Raises:
        ServingError: the prefix holds no ``config.yml``.
    """

    target = Path(models_dir) / model_id
    download_prefix(prefix, target, **s3_kwargs)
    if not (target / "config.yml").is_file():
        raise ServingError(
            f"s3 prefix {prefix!r} holds no config.yml. Fix: point --from-s3 at the folder that holds the Caikit "
            "model's config.yml (the upload puts it under <storage.prefix>/caikit)."
        )
    return target


def _runtime_config(host: str) -> dict[str, Any]:
    # so_reuseport 0: a second server on a taken gRPC port must fail instead of sharing it silently
    return {
        "runtime": {
            "grpc": {
                "options": {"grpc.so_reuseport": 0},
                "server_shutdown_grace_period_seconds": 2,
                "unix_socket_path": None,
            },
            "http": {"server_shutdown_grace_period_seconds": 2},
        },
    }


class LocalModelServer:
    """The caikit runtime serving ``models_dir`` on 127.0.0.1 (HTTP and gRPC), in its own process group.

    Args:
        models_dir: folder whose sub-folders are Caikit model directories (the folder name is the model id).
        http_port: HTTP port; `None` picks a free one.
        grpc_port: gRPC port; `None` picks a free one.
        startup_timeout: seconds to wait until every model answers a generation request.
        log_path: where the runtime's output goes; `None` uses a temporary file (see :attr:`log_path`).
        from_s3: S3 prefix of a Caikit model to download into ``models_dir/<model_id>`` first (KServe's storage
            initializer); S3 settings from the data-connection variables unless ``s3_kwargs`` say otherwise.
        model_id: the folder name for ``from_s3`` (default ``opt-350m-detox``, the recipes' export.model_id).
        s3_kwargs: passed to :func:`detox_sft.storage.download_prefix` (``settings=``, ``bucket=``, ...).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str],
        http_port: int | None = None,
        grpc_port: int | None = None,
        *,
        startup_timeout: float = 180.0,
        log_path: str | os.PathLike[str] | None = None,
        from_s3: str | None = None,
        model_id: str | None = None,
        s3_kwargs: dict[str, Any] | None = None,
    ) -> None:

        self.from_s3 = from_s3
        self.download_id = model_id or ExportConfig().model_id
        self.s3_kwargs = dict(s3_kwargs or {})
        self.models_dir = Path(models_dir).resolve()
        self.host = LOCALHOST
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.startup_timeout = startup_timeout
        self._log_path = Path(log_path) if log_path else None
        self._own_log = False  # a temporary log we made (removed on a clean stop)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API (``http://127.0.0.1:<port>``)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC API (plaintext)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        """The file that receives the runtime's output."""
        return self._log_path

    @property
    def model_ids(self) -> list[str]:
        """The served model ids (sub-folders of the models directory with a ``config.yml``)."""
        return model_ids(self.models_dir)

    def __enter__(self) -> LocalModelServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _check_ports(self) -> None:
        if self.http_port is None:
            self.http_port = free_port(self.host)
        if self.grpc_port is None:
            self.grpc_port = free_port(self.host)
            while self.grpc_port == self.http_port:
                self.grpc_port = free_port(self.host)
        if self.http_port == self.grpc_port:
            raise PortInUseError(f"HTTP and gRPC ports are both {self.http_port}. Fix: give two different ports.")
        for kind, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port)):
            if port_in_use(self.host, port):
                raise PortInUseError(
                    f"{kind} port {port} on {self.host} is already in use (another server, or a caikit runtime "
                    f"that did not exit). Fix: stop it (`ss -ltnp 'sport = :{port}'` shows the process) or choose "
                    "another port."
                )

    def start(self) -> LocalModelServer:
        """Start the runtime and wait until every model answers.

        Raises:
            PortInUseError: a port is taken.
            ServingError: no model in the models directory, or the runtime exited / did not answer in time
                (the message ends with its last log lines).
        """
        if self.process is not None and self.process.poll() is None:
            return self
        if self.from_s3 is not None:
            self._check_ports()  # refuse before downloading hundreds of MB
            self.models_dir.mkdir(parents=True, exist_ok=True)
            download_model(self.from_s3, self.models_dir, self.download_id, **self.s3_kwargs)
        ids = self.model_ids
        if not ids:
            raise ServingError(
                f"no Caikit model in {self.models_dir} (a model is a sub-folder with config.yml). Fix: run "
                "notebooks/3-save_convert_model.ipynb first (or `detox-sft export`), or use `serve --from-s3`."
            )
        self._check_ports()
        self._tmp = tempfile.TemporaryDirectory(prefix="detox-sft-caikit-")
        config_file = Path(self._tmp.name) / "runtime.yml"
        config_file.write_text(json.dumps(_runtime_config(self.host)))  # JSON is YAML
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="detox-sft-caikit-", suffix=".log")
            os.close(fd)
            self._log_path, self._own_log = Path(name), True
        env = dict(os.environ)
        env.update(
            RUNTIME_LIBRARY="caikit_nlp",
            RUNTIME_LOCAL_MODELS_DIR=str(self.models_dir),
            RUNTIME_HTTP_ENABLED="true",
            RUNTIME_GRPC_ENABLED="true",
            RUNTIME_HTTP_PORT=str(self.http_port),
            RUNTIME_GRPC_PORT=str(self.grpc_port),
            RUNTIME_METRICS_ENABLED="false",
            CONFIG_FILES=str(config_file),
            LOG_FORMATTER="pretty",
            HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
            TOKENIZERS_PARALLELISM="false",
            PYTHONWARNINGS="ignore",
        )
        env[_PARENT_ENV] = str(os.getpid())
        env[_HOST_ENV] = self.host
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from detox_sft_dev.model_server import _run_runtime; _run_runtime()"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() kills the runtime and anything it started
            )
        try:
            self._wait_ready(ids)
        except BaseException:  # any failure, Ctrl-C included: stop the runtime we started, then re-raise
            self._own_log = False  # keep the log the error message points to
            self.stop()
            raise
        return self

    def _log_tail(self, lines: int = 25) -> str:
        if not self._log_path or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def _load_errors(self) -> str:
        if not self._log_path or not self._log_path.exists():
            return ""
        lines = [x for x in self._log_path.read_text(errors="replace").splitlines() if "load failed" in x]
        return "\n".join(dict.fromkeys(lines)) or self._log_tail()

    def _wait_ready(self, ids: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(ids)
        missing_since: float | None = None
        while True:
            if self.process.poll() is not None:
                raise ServingError(
                    f"the caikit runtime exited with code {self.process.returncode} while starting. Its log "
                    f"({self._log_path}) ends with:\n{self._log_tail()}"
                )
            if self._healthy():
                status = {m: self._probe(m) for m in pending}
                pending = [m for m, code in status.items() if code != 200]
                if not pending and self._grpc_listening():
                    return
                # local models load before the servers start: one still unknown a few seconds after /health
                # answers failed to load (a broken config.yml or artifacts/), waiting longer will not help
                if any(code == 404 for code in status.values()):
                    missing_since = missing_since or time.monotonic()
                    if time.monotonic() - missing_since > 5:
                        failed = [m for m, code in status.items() if code == 404]
                        raise ServingError(
                            f"the caikit runtime did not load {failed} from {self.models_dir}. Fix: re-export the "
                            f"model (`detox-sft export`). From its log ({self._log_path}):\n{self._load_errors()}"
                        )
            if time.monotonic() > deadline:
                raise ServingError(
                    f"the caikit runtime did not answer within {self.startup_timeout:.0f} s (models not ready: "
                    f"{pending}). Its log ({self._log_path}) ends with:\n{self._log_tail()}"
                )
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _probe(self, model_id: str) -> int | None:
        """HTTP status of a one-token generation with ``model_id`` (None: no answer)."""
        body = json.dumps({"model_id": model_id, "inputs": "Hello", "parameters": {"max_new_tokens": 1}}).encode()
        req = urllib.request.Request(
            f"{self.http_url}/api/v1/task/text-generation", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status if "generated_text" in json.loads(resp.read()) else None
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):
            return None

    def _grpc_listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            return sock.connect_ex((self.host, self.grpc_port)) == 0

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the runtime: SIGTERM to its process group, SIGKILL after ``timeout`` seconds. Idempotent."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            # children left in the group (none expected) go too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._own_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path, self._own_log = None, False

    def wait(self) -> int:
        """Block until the runtime exits; returns its exit code."""
        if self.process is None:
            return 0
        return self.process.wait()


def _watch_parent(parent_pid: int) -> None:
    # the runtime must not outlive whoever started it (a test killed with SIGKILL, a closed terminal)
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.killpg(os.getpgrp(), signal.SIGTERM)
            time.sleep(5)
            os._exit(1)


def _run_runtime() -> None:
    """Launcher run in the server subprocess: caikit shims, parent watchdog, then caikit's own ``main()``."""

    caikit_shims.restore_numpy_issubclass()
    caikit_shims.bind_caikit_to_host(os.environ.get(_HOST_ENV, LOCALHOST))
    compat.fix_caikit_nlp_generate_args()
    parent = os.environ.get(_PARENT_ENV)
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    from caikit.runtime.__main__ import main as caikit_main

    code = 0
    try:
        caikit_main()
    except BaseException:  # reported in the log and in the exit code
        import traceback

        traceback.print_exc()
        code = 1
    # the servers are down once main() returns; interpreter teardown (thread pools, model __del__) takes seconds
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
