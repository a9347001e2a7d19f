"""Shims for the caikit runtime that the local model server (:mod:`detox_sft_dev.model_server`) starts; the helper
package never serves a model itself. Each shim has a test in tests/test_compat.py that fails when it is no longer
right or no longer needed.
"""

from __future__ import annotations

# caikit 0.28 / caikit-nlp 0.5.15 installed --no-deps on NumPy 2:
# caikit's HTTP server builds its pydantic request models with `np.issubclass_` (removed in NumPy 2.0): without it
# the runtime dies while starting the HTTP server. Its HTTP server binds "0.0.0.0" and its gRPC server "[::]", both
# hard-coded: the local model server for the demo and the tests must listen on 127.0.0.1 only.


def restore_numpy_issubclass() -> bool:
    """Give NumPy back ``np.issubclass_`` (removed in NumPy 2.0) for caikit's HTTP server; True if installed now."""
    import numpy as np

    if hasattr(np, "issubclass_"):
        return False

    def issubclass_(arg1, arg2) -> bool:  # NumPy 1.x semantics: False instead of TypeError for non-classes
        try:
            return issubclass(arg1, arg2)
        except TypeError:
            return False

    np.issubclass_ = issubclass_
    return True


def bind_caikit_to_host(host: str = "127.0.0.1") -> None:
    """Make the caikit runtime in this process listen on ``host``: wraps ``uvicorn.Config`` and ``grpc.server``.

    Process-wide: call it only in the process that runs the runtime.
    """
    import grpc
    import uvicorn

    if not getattr(uvicorn.Config, "_detox_sft_host", None):
        base_config = uvicorn.Config

        class _LocalConfig(base_config):
            _detox_sft_host = host

            def __init__(self, *args, **kwargs):
                kwargs["host"] = host
                super().__init__(*args, **kwargs)

        uvicorn.Config = _LocalConfig

    if not getattr(grpc.server, "_detox_sft_host", None):
        base_server = grpc.server

        def _rebind(address: str) -> str:
            return f"{host}:{address[len('[::]:') :]}" if address.startswith("[::]:") else address

        def server(*args, **kwargs):
            srv = base_server(*args, **kwargs)
            add_insecure, add_secure = srv.add_insecure_port, srv.add_secure_port
            srv.add_insecure_port = lambda address: add_insecure(_rebind(address))
            srv.add_secure_port = lambda address, credentials: add_secure(_rebind(address), credentials)
            return srv

        server._detox_sft_host = host
        grpc.server = server
