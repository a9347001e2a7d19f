"""Clients for the served model: caikit HTTP, caikit gRPC, and vLLM's OpenAI-compatible ``/v1/completions``.

Every client sends a bearer token when given one (OpenShift AI's token auth), verifies TLS by default (a CA bundle can
be given; ``verify=False`` only when asked), times out, retries a bounded number of times on 503 and refused
connections, and maps failures to the exceptions below, with the server's own message::

    ModelServerError            (base; any other server failure, e.g. 500 "index out of range" for an over-long input)
    ├── ModelNotFound           (404 / NOT_FOUND: no model with that id)
    ├── BadRequest              (400, 422 / INVALID_ARGUMENT: the server's detail is in the message)
    ├── Unauthorized            (401, 403 / UNAUTHENTICATED, PERMISSION_DENIED: token missing or wrong)
    ├── ServerUnavailable       (refused connection, 502-504 / UNAVAILABLE after the retries, timeouts)
    └── StreamingNotSupported   (the model's module cannot stream, e.g. caikit-nlp's local TextGeneration)

Usage::

    client = CaikitHttpClient("https://opt-350m-detox.apps.example.com", token=os.environ["MODEL_TOKEN"])
    client.generate_text("opt-350m-detox", "Prompt: you are\\nContinuation: ", max_new_tokens=20)

CLI: ``detox-sft query --url URL --model-id ID [--token T] [--grpc HOST:PORT] [--kind caikit|vllm] TEXT``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "ModelServerError",
    "ModelNotFound",
    "BadRequest",
    "Unauthorized",
    "ServerUnavailable",
    "StreamingNotSupported",
    "GenerationParams",
    "GenerationResult",
    "CaikitHttpClient",
    "CaikitGrpcClient",
    "VllmClient",
    "connect",
    "add_arguments",
    "main",
]

CAIKIT_TEXT_GENERATION = "/api/v1/task/text-generation"
CAIKIT_STREAMING = "/api/v1/task/server-streaming-text-generation"
GRPC_SERVICE = "caikit.runtime.Nlp.NlpService"
GRPC_REQUEST = "caikit.runtime.Nlp.TextGenerationTaskRequest"
GRPC_STREAM_REQUEST = "caikit.runtime.Nlp.ServerStreamingTextGenerationTaskRequest"
GRPC_RESULT = "caikit_data_model.nlp.GeneratedTextResult"
GRPC_STREAM_RESULT = "caikit_data_model.nlp.GeneratedTextStreamResult"


class ModelServerError(RuntimeError):
    """The model server answered with an error (or not at all); ``status`` is the HTTP status or gRPC code name."""

    def __init__(self, message: str, status: int | str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class ModelNotFound(ModelServerError):
    """No model with this id is served."""


class BadRequest(ModelServerError):
    """The server rejected the request; ``detail`` holds its explanation."""


class Unauthorized(ModelServerError):
    """The bearer token is missing, wrong or lacks the right to call the model."""


class ServerUnavailable(ModelServerError):
    """The server could not be reached (refused, 503, timeout) within the bounded retries."""


class StreamingNotSupported(ModelServerError):
    """The served model cannot stream (caikit-nlp's local module); the TGIS-backed runtime can."""


@dataclass
class GenerationParams:
    """Generation parameters shared by the caikit and vLLM clients.

    Attributes:
        max_new_tokens (`int`, defaults to 20): tokens to generate at most.
        min_new_tokens (`int` or `None`): tokens to generate at least.
        decoding (`str`, defaults to ``"greedy"``): ``greedy`` or ``sampling``.
        top_k (`int` or `None`), top_p (`float` or `None`), temperature (`float` or `None`): sampling settings.
        seed (`int` or `None`): sampling seed (reproducible sampling).
        repetition_penalty (`float` or `None`): penalty for repeated tokens.
        truncate_input_tokens (`int` or `None`): keep only the last this many input tokens (caikit: an input longer
            than the model's context fails without it); vLLM's ``truncate_prompt_tokens``.
    """

    max_new_tokens: int = 20
    min_new_tokens: int | None = None
    decoding: str = "greedy"
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    truncate_input_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.decoding not in ("greedy", "sampling"):
            raise ValueError(f"decoding: got {self.decoding!r}. Fix: use 'greedy' or 'sampling'.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: got {self.max_new_tokens!r}. Fix: use a whole number >= 1.")

    def caikit(self) -> dict[str, Any]:
        """The caikit ``parameters`` (HTTP) / request fields (gRPC); the prompt is never echoed back."""
        values = {k: v for k, v in asdict(self).items() if v is not None and k != "decoding"}
        values["decoding_method"] = self.decoding.upper()
        # the local module echoes the input by default, the TGIS module does not: ask both for the new text only
        values["preserve_input_text"] = False
        return values

    def openai(self) -> dict[str, Any]:
        """The OpenAI-compatible completion fields (vLLM)."""
        values: dict[str, Any] = {"max_tokens": self.max_new_tokens}
        if self.decoding == "greedy":
            values["temperature"] = 0.0
        else:
            values.update(
                {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p)) if v is not None}
            )
            if self.top_k is not None:
                values["top_k"] = self.top_k
        for ours, theirs in (
            ("seed", "seed"),
            ("min_new_tokens", "min_tokens"),
            ("repetition_penalty", "repetition_penalty"),
            ("truncate_input_tokens", "truncate_prompt_tokens"),
        ):
            if getattr(self, ours) is not None:
                values[theirs] = getattr(self, ours)
        return values


@dataclass
class GenerationResult:
    """One generation: the new text only (the prompt is not repeated), and what the server said about it."""

    text: str
    generated_tokens: int | None = None
    finish_reason: str | None = None
    input_token_count: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _params(params: GenerationParams | None, overrides: dict[str, Any]) -> GenerationParams:
    if params is None:
        return GenerationParams(**overrides)
    return GenerationParams(**{**asdict(params), **overrides}) if overrides else params


def _check_input(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("empty input text. Fix: give the prompt to continue.", status=400, detail="empty input")


class _TextOnly:
    """``generate_text`` for the clients, each of which implements ``generate``."""

    def generate_text(self, model_id: str, text: str, **params: Any) -> str:
        """Like ``generate``, returning the text only."""
        return self.generate(model_id, text, **params).text  # type: ignore[attr-defined]


class _HttpClient(_TextOnly):
    """Shared HTTP plumbing: session, bearer token, TLS, timeouts, bounded retries, error mapping."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        verify: bool = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        import requests

        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"url: got {url!r}. Fix: give the server's base URL, e.g. https://host or http://127.0.0.1:8080."
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        # TLS: verify by default, against the CA bundle when given (OpenShift's router / service CA)
        self.session.verify = str(ca_bundle) if (ca_bundle and verify) else bool(verify)
        if not verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        """Close the connection pool."""
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any], stream: bool = False):
        import requests

        url = f"{self.url}{path}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.session.post(url, json=body, timeout=self.timeout, stream=stream)
            except requests.exceptions.SSLError as exc:
                raise ModelServerError(
                    f"TLS verification failed for {self.url}: {exc}. Fix: pass the cluster's CA bundle "
                    "(--ca-bundle / ca_bundle=), or --insecure for a throwaway test cluster only."
                ) from exc
            except requests.exceptions.ConnectionError as exc:  # refused, DNS, reset: worth another try
                last = f"cannot connect to {self.url} ({exc.__class__.__name__})"
                continue
            except requests.exceptions.Timeout as exc:
                raise ServerUnavailable(
                    f"{url} did not answer within {self.timeout:.0f} s. Fix: check the server, or raise the timeout.",
                    status="timeout",
                ) from exc
            if resp.status_code in (502, 503, 504):  # the route or the server is (re)starting
                last = f"{url} answered {resp.status_code}"
                resp.close()
                continue
            if resp.status_code >= 400:
                self._raise(resp)
            return resp
        raise ServerUnavailable(
            f"model server unavailable after {self.retries + 1} attempts: {last}. Fix: check that the server runs "
            "(`detox-sft serve`, or `oc get inferenceservice`) and that the URL is right.",
            status=503,
        )

    @staticmethod
    def _detail(resp) -> str:
        try:
            data = resp.json()
        except ValueError:
            return resp.text.strip()[:500]
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict):  # OpenAI / vLLM
                return str(error.get("message", error))
            for key in ("details", "detail", "message", "error"):
                if key in data:
                    return str(data[key])
        return json.dumps(data)[:500]

    def _raise(self, resp) -> None:
        status, detail = resp.status_code, self._detail(resp)
        if status in (401, 403):
            raise Unauthorized(
                f"{resp.url}: {status} {detail or 'unauthorized'}. Fix: pass a valid token (--token, or the "
                "MODEL_TOKEN variable): `oc create token <service-account>` or the token in the model's details.",
                status,
                detail,
            )
        if status == 404:
            if detail == "Not Found":  # FastAPI's own 404: the path is wrong, not the model id
                raise ModelServerError(
                    f"{resp.url}: no such endpoint. Fix: check --url (the server's base URL) and --kind.",
                    status,
                    detail,
                )
            raise ModelNotFound(
                f"{detail or 'model not found'} ({resp.url}). Fix: use the served model id (the caikit folder name, "
                "the InferenceService name; GET /info/models lists them).",
                status,
                detail,
            )
        if status in (400, 422):
            raise BadRequest(f"bad request: {detail}", status, detail)
        hint = ""
        if "index out of range" in detail or "maximum context length" in detail:
            hint = " The input is probably longer than the model's context: set truncate_input_tokens."
        raise ModelServerError(f"{resp.url}: server error {status}: {detail}.{hint}", status, detail)


class CaikitHttpClient(_HttpClient):
    """The caikit runtime's HTTP API (``POST /api/v1/task/text-generation``).

    Args:
        url: base URL (``https://<inference service route>`` or ``http://127.0.0.1:<port>``).
        token: bearer token; `None` sends none.
        verify: verify the server's TLS certificate.
        ca_bundle: CA bundle file to verify against.
        timeout: seconds per request.
        retries: extra attempts on refused connections and 502/503/504.
        backoff: seconds before the first retry (doubling).
    """

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``; see :class:`GenerationParams`).

        The server judges the input (an empty one is answered 400 and raised as :class:`BadRequest`).
        """
        p = _params(params, overrides)
        resp = self._post(CAIKIT_TEXT_GENERATION, {"model_id": model_id, "inputs": text, "parameters": p.caikit()})
        data = resp.json()
        return GenerationResult(
            data.get("generated_text", ""),
            data.get("generated_tokens"),
            data.get("finish_reason"),
            data.get("input_token_count"),
            data,
        )

    def generate_stream(
        self, model_id: str, text: str, params: GenerationParams | None = None, fallback: bool = False, **overrides: Any
    ) -> Iterator[str]:
        """Stream the continuation in pieces (server-sent events).

        Args:
            fallback: when the model cannot stream (caikit-nlp's local module), yield the unary result once instead
                of raising :class:`StreamingNotSupported`.
        """
        _check_input(text)
        p = _params(params, overrides)
        resp = self._post(
            CAIKIT_STREAMING, {"model_id": model_id, "inputs": text, "parameters": p.caikit()}, stream=True
        )
        sent = False
        with resp:
            event = "message"
            for line in resp.iter_lines(decode_unicode=True):
                if not line:
                    event = "message"
                    continue
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                    continue
                if not line.startswith("data:"):
                    continue
                data = json.loads(line[len("data:") :].strip())
                if event == "error":
                    code, detail = data.get("code", 500), str(data.get("details", data))
                    if not sent and code >= 500:
                        if fallback:
                            yield self.generate(model_id, text, p).text
                            return
                        raise StreamingNotSupported(
                            f"the server could not stream {model_id!r} ({detail}): caikit-nlp's local module does "
                            "not stream (the TGIS-backed runtime does). Fix: use generate(), or fallback=True.",
                            code,
                            detail,
                        )
                    cls = {404: ModelNotFound, 400: BadRequest, 422: BadRequest}.get(code, ModelServerError)
                    raise cls(f"streaming failed: {detail}", code, detail)
                piece = data.get("generated_text", "")
                if piece:
                    sent = True
                    yield piece


class VllmClient(_HttpClient):
    """vLLM's OpenAI-compatible API (``POST /v1/completions``), for the vLLM ServingRuntime (plain HF directory).

    Same arguments as :class:`CaikitHttpClient`; ``url`` is the server's base URL (without ``/v1``).
    """

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Complete ``text`` with model ``model_id`` (the served model name)."""
        _check_input(text)
        p = _params(params, overrides)
        base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        body = {"model": model_id, "prompt": text, **p.openai()}
        resp = self._post("/v1/completions" if base == self.url else "/completions", body)
        data = resp.json()
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelServerError(f"unexpected completion response: {str(data)[:300]}") from exc
        usage = data.get("usage") or {}
        return GenerationResult(
            choice.get("text", ""),
            usage.get("completion_tokens"),
            choice.get("finish_reason"),
            usage.get("prompt_tokens"),
            data,
        )


def _auth_interceptor(token: str):
    """An interceptor adding ``authorization: Bearer <token>`` to every call, reflection included (plaintext or TLS)."""
    import grpc

    header = ("authorization", f"Bearer {token}")

    class _Details(grpc.ClientCallDetails):
        def __init__(self, details) -> None:
            self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
            self.wait_for_ready = getattr(details, "wait_for_ready", None)
            self.compression = getattr(details, "compression", None)
            self.metadata = [*(details.metadata or []), header]

    class _AuthInterceptor(
        grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor
    ):
        def intercept_unary_unary(self, continuation, details, request):
            return continuation(_Details(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(_Details(details), request)

        def intercept_stream_stream(self, continuation, details, request_iterator):
            return continuation(_Details(details), request_iterator)

    return _AuthInterceptor()


class CaikitGrpcClient(_TextOnly):
    """The caikit runtime's gRPC API (``caikit.runtime.Nlp.NlpService/TextGenerationTaskPredict``, ``mm-model-id``).

    Message types come from the server by gRPC reflection (as caikit-nlp-client does); unlike caikit-nlp-client 0.0.8
    this client sends the bearer token (metadata on every call, reflection included) and maps errors.

    Args:
        target: ``host:port``.
        token: bearer token; `None` sends none.
        plaintext: no TLS (a local server); otherwise TLS, verified against ``ca_bundle`` or the system roots.
        verify: with ``False`` the server's own certificate is fetched and trusted (throwaway clusters only).
        ca_bundle: CA bundle file (PEM).
        timeout: seconds per call.
        retries: extra attempts on UNAVAILABLE (refused connection, server starting).
        backoff: seconds before the first retry (doubling).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        plaintext: bool = False,
        verify: bool = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        import grpc

        for scheme in ("grpc://", "http://", "https://"):
            if target.startswith(scheme):
                plaintext = plaintext or scheme != "https://"
                target = target[len(scheme) :]
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"grpc target: got {target!r}. Fix: give host:port, e.g. 127.0.0.1:8085.")
        self.target = target
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        if plaintext:
            channel = grpc.insecure_channel(target)
        else:
            root = None
            if ca_bundle and verify:
                with open(ca_bundle, "rb") as fh:
                    root = fh.read()
            elif not verify:
                import ssl

                root = ssl.get_server_certificate((host, int(port))).encode()
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))
        self._raw_channel = channel
        self.channel = grpc.intercept_channel(channel, _auth_interceptor(token)) if token else channel
        self._stubs: dict[str, Any] | None = None

    def close(self) -> None:
        """Close the channel."""
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _load_stubs(self) -> dict[str, Any]:
        if self._stubs is None:
            from google.protobuf.descriptor_pool import DescriptorPool
            from google.protobuf.message_factory import GetMessageClass
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
                ProtoReflectionDescriptorDatabase,
            )

            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
            try:
                req = GetMessageClass(pool.FindMessageTypeByName(GRPC_REQUEST))
                res = GetMessageClass(pool.FindMessageTypeByName(GRPC_RESULT))
            except KeyError as exc:
                raise ModelServerError(
                    f"{self.target} does not serve caikit's text generation ({exc}). Fix: check the gRPC target."
                ) from exc
            self._stubs = {
                "request": req,
                "predict": self.channel.unary_unary(
                    f"/{GRPC_SERVICE}/TextGenerationTaskPredict",
                    request_serializer=req.SerializeToString,
                    response_deserializer=res.FromString,
                ),
            }
        return self._stubs

    def _call(self, fn):
        import grpc

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code == grpc.StatusCode.UNAVAILABLE:
                    last = details or "unavailable"
                    continue
                self._raise(code, details)
        raise ServerUnavailable(
            f"gRPC server {self.target} unavailable after {self.retries + 1} attempts: {last}. Fix: check that the "
            "server runs and the target is right (plaintext for a local server, TLS for a cluster route).",
            status="UNAVAILABLE",
        )

    def _raise(self, code, details: str) -> None:
        import grpc

        name = code.name if code is not None else "UNKNOWN"
        if code == grpc.StatusCode.NOT_FOUND:
            raise ModelNotFound(f"{details}. Fix: use the served model id (the caikit folder name).", name, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise BadRequest(f"bad request: {details}", name, details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise Unauthorized(f"{name}: {details}. Fix: pass a valid token (--token or MODEL_TOKEN).", name, details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ServerUnavailable(f"no answer within {self.timeout:.0f} s. Fix: raise the timeout.", name, details)
        hint = (
            " The input is probably longer than the model's context: set truncate_input_tokens."
            if ("index out of range" in (details or ""))
            else ""
        )
        raise ModelServerError(f"gRPC {name}: {details}.{hint}", name, details)

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``; see :class:`GenerationParams`).

        An empty ``text`` is refused here: the gRPC API cannot tell it from an unset field and would generate from
        nothing, while the HTTP API answers 400.
        """
        _check_input(text)
        p = _params(params, overrides)
        stubs = self._call(self._load_stubs)
        fields = {f.name for f in stubs["request"].DESCRIPTOR.fields}
        request = stubs["request"](text=text, **{k: v for k, v in p.caikit().items() if k in fields})
        metadata = [("mm-model-id", model_id)]
        response = self._call(lambda: stubs["predict"](request, metadata=metadata, timeout=self.timeout))
        from google.protobuf.json_format import MessageToDict

        raw = MessageToDict(response, preserving_proto_field_name=True)
        return GenerationResult(
            response.generated_text,
            int(response.generated_tokens),
            raw.get("finish_reason"),
            int(response.input_token_count),
            raw,
        )


def connect(
    recipe=None,
    *,
    url: str | None = None,
    grpc_target: str | None = None,
    kind: str = "caikit",
    token: str | None = None,
    ca_bundle: str | None = None,
    verify: bool | None = None,
    timeout: float | None = None,
    retries: int = 3,
):
    """A client for the served model; unset arguments come from ``recipe.serving`` (token from its ``token_env``).

    Args:
        recipe: a :class:`detox_sft.config.Recipe` (or `None`: defaults, token from ``MODEL_TOKEN``).
        url: HTTP base URL (caikit or vLLM).
        grpc_target: ``host:port``; given (and ``kind`` caikit), the gRPC client is returned. It is plaintext when
            ``url`` is plain ``http://`` (a local server) or the target starts with ``grpc://``, TLS otherwise.
        kind: ``caikit`` or ``vllm``.
        token: bearer token; `None` reads the environment variable ``recipe.serving.token_env``.
        ca_bundle, verify, timeout: TLS and time limits (default: the recipe's).
        retries: extra attempts on 503 / refused connections.

    Returns:
        A :class:`CaikitHttpClient`, :class:`CaikitGrpcClient` or :class:`VllmClient`.
    """
    from detox_sft.config import ServingConfig

    cfg = recipe.serving if recipe is not None else ServingConfig()
    if grpc_target is None and url is None:
        grpc_target = cfg.grpc_target
    url = url or cfg.url
    token = token if token is not None else (os.environ.get(cfg.token_env) or None)
    verify = cfg.verify_tls if verify is None else verify
    ca_bundle = ca_bundle or cfg.ca_bundle
    timeout = timeout or cfg.timeout
    if kind not in ("caikit", "vllm"):
        raise ValueError(f"kind: got {kind!r}. Fix: use 'caikit' or 'vllm'.")
    if kind == "caikit" and grpc_target:
        plaintext = bool(url and url.startswith("http://"))
        return CaikitGrpcClient(
            grpc_target,
            token=token,
            plaintext=plaintext,
            verify=verify,
            ca_bundle=ca_bundle,
            timeout=timeout,
            retries=retries,
        )
    if not url:
        raise ValueError(
            "no server URL. Fix: pass --url (or set serving.url in the recipe); on OpenShift AI: "
            "`oc get inferenceservice <name> -o jsonpath='{.status.url}'`."
        )
    cls = VllmClient if kind == "vllm" else CaikitHttpClient
    return cls(url, token=token, verify=verify, ca_bundle=ca_bundle, timeout=timeout, retries=retries)


def add_arguments(parser) -> None:
    """Flags of ``detox-sft query``."""
    parser.add_argument("text", metavar="TEXT", help="the prompt to continue")
    parser.add_argument("--url", default=None, help="server base URL (default: serving.url of the recipe)")
    parser.add_argument("--model-id", default=None, help="served model id (default: export.model_id of the recipe)")
    parser.add_argument(
        "--token", default=None, help="bearer token (default: the env variable serving.token_env, MODEL_TOKEN)"
    )
    parser.add_argument(
        "--grpc",
        default=None,
        metavar="HOST:PORT",
        help="query over caikit gRPC instead of HTTP (plaintext when --url is http://)",
    )
    parser.add_argument("--kind", choices=("caikit", "vllm"), default="caikit", help="server API (default caikit)")
    parser.add_argument("--ca-bundle", default=None, help="CA bundle (PEM) to verify the server's certificate")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (test clusters only)")
    parser.add_argument("--recipe", default=None, help="recipe name or path (serving and export sections)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--truncate-input-tokens", type=int, default=None)
    parser.add_argument("--stream", action="store_true", help="stream (caikit HTTP; falls back when unsupported)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per request")


def main(args) -> int:
    """Run ``detox-sft query``: print the generated text (errors on stderr, exit code 1)."""
    from detox_sft.config import ExportConfig, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    model_id = args.model_id or (recipe.export if recipe else ExportConfig()).model_id
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens,
        decoding="sampling" if args.sampling else "greedy",
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
        truncate_input_tokens=args.truncate_input_tokens,
    )
    try:
        client = connect(
            recipe,
            url=args.url,
            grpc_target=args.grpc,
            kind=args.kind,
            token=args.token,
            ca_bundle=args.ca_bundle,
            verify=False if args.insecure else None,
            timeout=args.timeout,
        )
        if args.stream and isinstance(client, CaikitHttpClient):
            for piece in client.generate_stream(model_id, args.text, params, fallback=True):
                print(piece, end="", flush=True)
            print()
        else:
            print(client.generate(model_id, args.text, params).text)
    except (ModelServerError, ValueError, OSError) as exc:
        print(f"detox-sft query: {exc}", file=sys.stderr)
        return 1
    return 0
