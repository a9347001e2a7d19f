"""Clients for the served model: caikit HTTP, caikit gRPC, and vLLM's OpenAI-compatible ``/v1/completions``.

Every client sends a bearer token when given one (OpenShift AI's token auth), verifies TLS by default (a CA bundle can
be given; ``verify=False`` only when asked), times out, retries a bounded number of times on 502-504 / UNAVAILABLE and
refused connections (urllib3's ``Retry``, gRPC's ``retryPolicy``), and maps failures to the exceptions below, with the
server's own message::

    ModelServerError            (base; any other server failure, e.g. 500 "index out of range" for an over-long input)
    ├── ModelNotFound           (404 / NOT_FOUND: no model with that id)
    ├── BadRequest              (400, 422 / INVALID_ARGUMENT: the server's detail is in the message)
    ├── Unauthorized            (401, 403 / UNAUTHENTICATED, PERMISSION_DENIED: token missing or wrong)
    ├── ServerUnavailable       (refused connection, 502-504 / UNAVAILABLE after the retries, timeouts, a connection
    │                            dropped before the answer)
    └── StreamingNotSupported   (the model's module cannot stream, e.g. caikit-nlp's local TextGeneration)
    InsecureTokenError          (a ValueError, raised before connecting: a token would travel without TLS)

A token travels only over TLS, or in plaintext to a loopback address (127.0.0.0/8, ::1, localhost: the local
runtime). It is read from the environment variable ``serving.token_env`` or the file ``serving.token_file``
(:func:`read_token`), never from the command line, and never printed.

Usage::

    client = connect(recipe, url="https://opt-350m-detox.apps.example.com")  # token from $MODEL_TOKEN
    client.generate_text("opt-350m-detox", generation_prompt("you are"), max_new_tokens=20)

CLI: ``detox-sft query --url URL --model-id ID [--token-env VAR | --token-file PATH] [--grpc HOST:PORT]
[--kind caikit|vllm] TEXT``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from detox_sft.config import ServingConfig

__all__ = [
    "ModelServerError",
    "ModelNotFound",
    "BadRequest",
    "Unauthorized",
    "ServerUnavailable",
    "StreamingNotSupported",
    "InsecureTokenError",
    "GenerationParams",
    "GenerationResult",
    "CaikitHttpClient",
    "CaikitGrpcClient",
    "VllmClient",
    "connect",
    "read_token",
    "is_loopback",
    "parse_caikit_result",
    "parse_completion",
    "parse_sse",
    "error_detail",
]

CAIKIT_TEXT_GENERATION = "/api/v1/task/text-generation"
CAIKIT_STREAMING = "/api/v1/task/server-streaming-text-generation"
GRPC_SERVICE = "caikit.runtime.Nlp.NlpService"
GRPC_REQUEST = "caikit.runtime.Nlp.TextGenerationTaskRequest"
GRPC_STREAM_REQUEST = "caikit.runtime.Nlp.ServerStreamingTextGenerationTaskRequest"
GRPC_RESULT = "caikit_data_model.nlp.GeneratedTextResult"
GRPC_STREAM_RESULT = "caikit_data_model.nlp.GeneratedTextStreamResult"
GRPC_REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
# a bearer token as RFC 6750 writes it (b64token): anything else would end up echoed in a library's header error
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


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


class InsecureTokenError(ValueError):
    """A bearer token would be sent without TLS to a host other than this machine; raised before any connection."""


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


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: ``localhost``, 127.0.0.0/8 or ::1 (IPv6 with or without brackets)."""
    if not isinstance(host, str):
        return False
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:  # another name: it may resolve anywhere
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _check_token(token: str | None, tls: bool, host: str, where: str) -> str | None:
    """``token`` (`None` when empty) once it is well formed and goes over TLS or to this machine; before connecting."""
    if token is None or token == "":
        return None
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise ValueError(
            "the bearer token holds characters a token cannot have (spaces, quotes, line breaks, non-ASCII). Fix: "
            "put only the token in the variable or file (`oc create token <service-account>` prints one)."
        )
    if not tls and not is_loopback(host):
        raise InsecureTokenError(
            f"refusing to send the bearer token to {where} in plaintext: anyone on the way could read and reuse it. "
            "Fix: use the server's TLS endpoint (an https:// URL; for gRPC a grpcs:// target or plaintext=False), "
            "or send no token. Plaintext with a token is allowed only to this machine (127.0.0.1, ::1, localhost)."
        )
    return token


def read_token(serving: ServingConfig | None = None) -> str | None:
    """The bearer token named by ``serving``: the file ``token_file`` when set, else the variable ``token_env``.

    Surrounding whitespace (the newline of ``oc create token > file``) is dropped; `None` when the variable is unset
    or empty. Pass the token to the clients this way, never on a command line (``ps`` and shell history show it).

    Raises:
        ValueError: ``token_file`` is set but cannot be read, or is empty.
    """
    cfg = serving if serving is not None else ServingConfig()
    if cfg.token_file:
        path = Path(cfg.token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(
                f"serving.token_file: cannot read {path} ({reason}). Fix: write the token into it "
                f"(`oc create token <service-account> > {path}`), or unset token_file to use ${cfg.token_env}."
            ) from None
        if not token:
            raise ValueError(
                f"serving.token_file: {path} is empty. Fix: write the token into it "
                f"(`oc create token <service-account> > {path}`)."
            )
        return token
    if not cfg.token_env:
        return None
    return os.environ.get(cfg.token_env, "").strip() or None


def _redact(text: str, token: str | None) -> str:
    # a server (or a proxy) may echo the request's headers in its error body; a string this short is no real
    # token (a service-account token has hundreds of characters) and would mangle ordinary words
    if token and len(token) >= 8 and isinstance(text, str):
        return text.replace(token, "<token>")
    return text


def _snippet(value: Any, limit: int = 300) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(body: Any, what: str) -> Any:
    """``body`` (bytes or str off the wire) decoded as JSON; anything else is taken as already decoded."""
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON (a proxy's HTML page, a login form), or absurdly nested
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
        raise ModelServerError(
            f"{what}: the server did not answer JSON ({_snippet(text.strip(), 200)!r}). Fix: check the URL "
            "(a proxy or a login page answers HTML) and --kind."
        ) from None


def _count(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_caikit_result(body: Any) -> GenerationResult:
    """A caikit text-generation answer (the HTTP body as bytes or str, or its decoded JSON) as a result.

    Counts that are not whole numbers and a ``finish_reason`` that is not a string are dropped (`None`).

    Raises:
        ModelServerError: the body is not JSON, or not an object whose ``generated_text`` (if any) is a string.
    """
    data = _json(body, "caikit text generation")
    if not isinstance(data, dict) or not isinstance(data.get("generated_text", ""), str):
        raise ModelServerError(
            f"unexpected caikit response: {_snippet(data)}. Fix: check --url and --kind (vLLM answers /v1/completions)."
        )
    reason = data.get("finish_reason")
    return GenerationResult(
        data.get("generated_text", ""),
        _count(data, "generated_tokens"),
        reason if isinstance(reason, str) else None,
        _count(data, "input_token_count"),
        data,
    )


def parse_completion(body: Any) -> GenerationResult:
    """An OpenAI-compatible completion (vLLM's ``/v1/completions`` body, bytes, str or decoded) as a result.

    Raises:
        ModelServerError: the body is not JSON, or has no ``choices[0]`` object with a string ``text``.
    """
    data = _json(body, "completion")
    try:
        choice = data["choices"][0]
        text = choice.get("text", "")
    except (KeyError, IndexError, TypeError, AttributeError):
        text = None
    if not isinstance(text, str):
        raise ModelServerError(f"unexpected completion response: {_snippet(data)}. Fix: check --url and --kind.")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    reason = choice.get("finish_reason")
    return GenerationResult(
        text,
        _count(usage, "completion_tokens"),
        reason if isinstance(reason, str) else None,
        _count(usage, "prompt_tokens"),
        data,
    )


def parse_sse(lines: Iterable[bytes | str] | bytes | str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` pairs of a server-sent-event stream, given line by line or whole (UTF-8).

    Raises:
        ModelServerError: a ``data:`` line is not a JSON object.
    """
    if isinstance(lines, (bytes, bytearray)):
        lines = lines.decode("utf-8", "replace")
    if isinstance(lines, str):  # SSE breaks lines at CR, LF and CRLF only (str.splitlines knows more breaks)
        lines = re.split(r"\r\n|\r|\n", lines)
    event = "message"
    for line in lines:
        if isinstance(line, (bytes, bytearray)):
            line = line.decode("utf-8", "replace")
        if not isinstance(line, str):
            raise ModelServerError(f"unexpected stream line: {_snippet(line)} (expected text).")
        line = line.rstrip("\r\n")
        if not line:
            event = "message"
            continue
        if line.startswith("event:"):
            event = line[len("event:") :].strip()
            continue
        if not line.startswith("data:"):
            continue
        data = _json(line[len("data:") :].strip(), "stream event")
        if not isinstance(data, dict):
            raise ModelServerError(f"unexpected stream event: {_snippet(data)} (expected a JSON object).")
        yield event, data


def error_detail(body: Any) -> str:
    """The server's explanation in an error body (caikit ``details``, FastAPI ``detail``, OpenAI ``error.message``).

    At most 500 characters; the body's text itself when it is not JSON. Never raises.
    """
    try:
        data = _json(body, "error")
    except ModelServerError:
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
        return text.strip()[:500]
    try:
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict):  # OpenAI / vLLM
                return str(error.get("message", error))[:500]
            for key in ("details", "detail", "message", "error"):
                if key in data:
                    return str(data[key])[:500]
        return _snippet(data, 500)
    except RecursionError:
        return "(an error body nested too deeply to show)"


class _TextOnly:
    """``generate_text`` for the clients, each of which implements ``generate``."""

    def generate_text(self, model_id: str, text: str, **params: Any) -> str:
        """Like ``generate``, returning the text only."""
        return self.generate(model_id, text, **params).text  # type: ignore[attr-defined]


def _http_retry(retries: int, backoff: float, timeout: float):
    """urllib3's ``Retry`` for the clients: what is resent, how often, how long apart."""
    from urllib3.util import Retry

    return Retry(
        total=retries,
        connect=retries,  # refused / unreachable: the request never left, resending is safe
        read=False,  # dropped after the request went out: not resent (the server may have run it, or died of it)
        status=retries,
        other=0,
        # text generation changes nothing on the server, so a POST answered 502-504 (route or pod restarting) is
        # safe to resend; 500 (a failure of this very input) and 4xx are not resent
        allowed_methods=frozenset({"GET", "POST"}),
        status_forcelist=(502, 503, 504),
        backoff_factor=backoff,
        retry_after_max=max(1, int(timeout)),  # a server's Retry-After is honoured, up to one request's timeout
        raise_on_status=False,  # the last 5xx comes back, to be raised with the server's own detail
    )


def _attempts(resp) -> int:
    retry = getattr(resp.raw, "retries", None)
    return len(retry.history) + 1 if retry is not None else 1


def _reason(exc: BaseException) -> str:
    inner = exc.args[0] if exc.args else exc
    inner = getattr(inner, "reason", None) or inner  # urllib3's MaxRetryError wraps the last error
    return _snippet(str(inner), 200)


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
        from requests.adapters import HTTPAdapter

        parsed = urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"url: got {url!r}. Fix: give the server's base URL, e.g. https://host or http://127.0.0.1:8080."
            )
        self.url = url.rstrip("/")
        self._token = _check_token(token, parsed.scheme == "https", parsed.hostname or "", self.url)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=_http_retry(self.retries, backoff, timeout))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Accept"] = "application/json"
        if self._token:
            self.session.headers["Authorization"] = f"Bearer {self._token}"
        if parsed.scheme == "http" and is_loopback(parsed.hostname or ""):
            # straight to this machine: a proxy from HTTP_PROXY would carry the plaintext request (token) off it
            self.session.trust_env = False
        # TLS: verify by default, against the CA bundle when given (OpenShift's router / service CA)
        self.session.verify = str(ca_bundle) if (ca_bundle and verify) else bool(verify)
        if not verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def __repr__(self) -> str:
        token = "<set>" if self._token else None
        return f"{type(self).__name__}({self.url!r}, token={token}, timeout={self.timeout:g}, retries={self.retries})"

    def close(self) -> None:
        """Close the connection pool."""
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any], stream: bool = False):
        import requests
        import urllib3

        url = f"{self.url}{path}"
        try:
            resp = self.session.post(url, json=body, timeout=self.timeout, stream=stream)
        except requests.exceptions.SSLError as exc:
            raise ModelServerError(
                f"TLS verification failed for {self.url}: {exc}. Fix: pass the cluster's CA bundle "
                "(--ca-bundle / ca_bundle=), or --insecure for a throwaway test cluster only."
            ) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise ServerUnavailable(
                f"{url} did not answer within {self.timeout:g} s. Fix: check the server, or raise the timeout.",
                status="timeout",
            ) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.MaxRetryError):
                raise ServerUnavailable(
                    f"cannot connect to {self.url} after {self.retries + 1} attempts ({_reason(exc)}). Fix: check "
                    "that the server runs (`detox-sft serve`, or `oc get inferenceservice`) and that the URL is right.",
                    status=503,
                ) from exc
            raise self._dropped(url, exc) from exc
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise ModelServerError(f"{url}: the request failed ({type(exc).__name__}: {_reason(exc)}).") from exc
        if resp.status_code >= 400:
            self._raise(resp)
        return resp

    @staticmethod
    def _dropped(url: str, exc: BaseException) -> ServerUnavailable:
        return ServerUnavailable(
            f"{url}: the connection closed before the server answered ({_reason(exc)}); the request was not resent, "
            "as the server may have run it (or died of it). Fix: check the server's state and log (`oc get pods`, "
            "or the output of `detox-sft serve`), then retry.",
            status="disconnected",
        )

    def _raise(self, resp) -> None:
        status, detail = resp.status_code, _redact(error_detail(resp.content), self._token)
        if status in (401, 403):
            raise Unauthorized(
                f"{resp.url}: {status} {detail or 'unauthorized'}. Fix: give a valid token in the variable "
                "serving.token_env (MODEL_TOKEN) or the file serving.token_file (`--token-env`, `--token-file`): "
                "`oc create token <service-account>`, or the token in the model's details.",
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
        if status in (502, 503, 504):  # urllib3 resent it as often as allowed
            raise ServerUnavailable(
                f"{resp.url}: {status} {detail or 'unavailable'}, after {_attempts(resp)} attempts. Fix: the server "
                "is (re)starting or overloaded: check `oc get inferenceservice` (or `detox-sft serve`), retry later.",
                status,
                detail,
            )
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
        retries: extra attempts on refused connections and 502/503/504 (urllib3's ``Retry``); a connection dropped
            after the request went out is not resent.
        backoff: urllib3's backoff factor: the first retry comes at once, the n-th after ``backoff * 2**(n-1)`` s.

    Raises:
        InsecureTokenError: a token with a plain ``http://`` URL to a host other than this machine.
    """

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``; see :class:`GenerationParams`).

        The server judges the input (an empty one is answered 400 and raised as :class:`BadRequest`).
        """
        p = _params(params, overrides)
        resp = self._post(CAIKIT_TEXT_GENERATION, {"model_id": model_id, "inputs": text, "parameters": p.caikit()})
        return parse_caikit_result(resp.content)

    def generate_stream(
        self, model_id: str, text: str, params: GenerationParams | None = None, fallback: bool = False, **overrides: Any
    ) -> Iterator[str]:
        """Stream the continuation in pieces (server-sent events).

        Args:
            fallback: when the model cannot stream (caikit-nlp's local module), yield the unary result once instead
                of raising :class:`StreamingNotSupported`.
        """
        import requests
        import urllib3

        _check_input(text)
        p = _params(params, overrides)
        resp = self._post(
            CAIKIT_STREAMING, {"model_id": model_id, "inputs": text, "parameters": p.caikit()}, stream=True
        )
        sent = False
        with resp:
            try:
                for event, data in parse_sse(resp.iter_lines()):
                    if event == "error":
                        code = data.get("code") if isinstance(data.get("code"), int) else 500
                        detail = _redact(str(data.get("details", data)), self._token)
                        if not sent and code >= 500:
                            if fallback:
                                yield self.generate(model_id, text, p).text
                                return
                            raise StreamingNotSupported(
                                f"the server could not stream {model_id!r} ({detail}): caikit-nlp's local module "
                                "does not stream (the TGIS-backed runtime does). Fix: use generate(), or "
                                "fallback=True.",
                                code,
                                detail,
                            )
                        cls = {404: ModelNotFound, 400: BadRequest, 422: BadRequest}.get(code, ModelServerError)
                        raise cls(f"streaming failed: {detail}", code, detail)
                    piece = data.get("generated_text", "")
                    if piece and isinstance(piece, str):
                        sent = True
                        yield piece
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ReadTimeoutError):
                    raise ServerUnavailable(
                        f"the stream from {self.url} stalled for {self.timeout:g} s. Fix: check the server, or "
                        "raise the timeout.",
                        status="timeout",
                    ) from exc
                raise self._dropped(f"{self.url}{CAIKIT_STREAMING}", exc) from exc


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
        return parse_completion(resp.content)


def _grpc_options(retries: int, backoff: float, timeout: float) -> list[tuple[str, Any]]:
    """Channel options: a default deadline and gRPC's own retries (``retryPolicy``) for caikit and reflection."""
    method: dict[str, Any] = {
        "name": [{"service": GRPC_SERVICE}, {"service": GRPC_REFLECTION}],
        # the default deadline: reflection calls (made inside protobuf's descriptor pool) get one too
        "timeout": f"{timeout:.3f}s",
    }
    if retries > 0:
        method["retryPolicy"] = {
            "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
            "initialBackoff": f"{max(backoff, 0.001):.3f}s",  # gRPC jitters each backoff by +-20 %
            "maxBackoff": "30s",
            "backoffMultiplier": 2,
            # refused, reset, server (re)starting; not INTERNAL, the failure of this very input
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return [
        ("grpc.enable_retries", int(retries > 0)),
        ("grpc.service_config", json.dumps({"methodConfig": [method]})),
        # reconnect as soon as a retry is due (by default a refused connection is next tried after 1 s, then later)
        ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff * 1000))),
    ]


class CaikitGrpcClient(_TextOnly):
    """The caikit runtime's gRPC API (``caikit.runtime.Nlp.NlpService/TextGenerationTaskPredict``, ``mm-model-id``).

    Message types come from the server by gRPC reflection (as caikit-nlp-client does); unlike caikit-nlp-client 0.0.8
    this client sends the bearer token (gRPC call credentials on every call, reflection included) and maps errors.

    Args:
        target: ``host:port``; ``grpc://host:port`` for plaintext, ``grpcs://host:port`` for TLS.
        token: bearer token; `None` sends none. Sent only over TLS, or in plaintext to this machine.
        plaintext: no TLS; `None` (default): as the target's scheme says, else plaintext for a loopback host (the
            local runtime) and TLS for any other, verified against ``ca_bundle`` or the system roots.
        verify: with ``False`` the server's own certificate is fetched and trusted (throwaway clusters only).
        ca_bundle: CA bundle file (PEM).
        timeout: seconds per call.
        retries: extra attempts on UNAVAILABLE (refused or dropped connection, server starting): gRPC's
            ``retryPolicy``, at most 5 attempts in all.
        backoff: gRPC's initial backoff in seconds (doubling, jittered by gRPC).

    Raises:
        InsecureTokenError: a token with a plaintext channel to a host other than this machine.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        plaintext: bool | None = None,
        verify: bool = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        import grpc

        fix = "Fix: give host:port, grpc://host:port (plaintext) or grpcs://host:port (TLS), e.g. 127.0.0.1:8085."
        if not isinstance(target, str):
            raise ValueError(f"grpc target: got {target!r}. {fix}")
        scheme, sep, rest = target.partition("://")
        if sep:
            if scheme not in ("grpc", "grpcs", "http", "https"):
                raise ValueError(f"grpc target: got {target!r}. {fix}")
            target = rest
            plaintext = scheme in ("grpc", "http") if plaintext is None else plaintext
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"grpc target: got {target!r}. {fix}")
        if plaintext is None:
            plaintext = is_loopback(host)
        self.target = target
        self.plaintext = bool(plaintext)
        self._token = _check_token(token, not plaintext, host, target)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        options = _grpc_options(self.retries, backoff, timeout)
        if plaintext and self._token:
            # to this machine only (checked above): local credentials let gRPC attach call credentials without TLS,
            # and gRPC itself refuses them for a peer that is not on this machine
            creds = grpc.composite_channel_credentials(
                grpc.local_channel_credentials(), grpc.access_token_call_credentials(self._token)
            )
            self.channel = grpc.secure_channel(target, creds, options)
        elif plaintext:
            self.channel = grpc.insecure_channel(target, options)
        else:
            root = None
            if ca_bundle and verify:
                with open(ca_bundle, "rb") as fh:
                    root = fh.read()
            elif not verify:
                import ssl

                root = ssl.get_server_certificate((host.strip("[]"), int(port))).encode()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            if self._token:
                creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self._token))
            self.channel = grpc.secure_channel(target, creds, options)
        self._stubs: dict[str, Any] | None = None

    def __repr__(self) -> str:
        token = "<set>" if self._token else None
        tls = "plaintext" if self.plaintext else "TLS"
        return f"CaikitGrpcClient({self.target!r}, {tls}, token={token}, timeout={self.timeout:g})"

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

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

        try:
            return fn()  # retried by the channel's retryPolicy
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
        # raised outside the handler: our message has the code and the (redacted) details, the RpcError is not kept
        raise self._error(code, details)

    def _error(self, code, details: str | None) -> ModelServerError:
        import grpc

        details = _redact(details or "", self._token)
        name = code.name if code is not None else "UNKNOWN"
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailable(
                f"gRPC server {self.target} unavailable after {min(self.retries + 1, 5)} attempts: {details}. Fix: "
                "check that the server runs and the target is right (grpc://host:port for a plaintext local server, "
                "grpcs://host:port for a cluster route).",
                name,
                details,
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return ModelNotFound(f"{details}. Fix: use the served model id (the caikit folder name).", name, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return BadRequest(f"bad request: {details}", name, details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return Unauthorized(
                f"{name}: {details}. Fix: give a valid token in the variable serving.token_env (MODEL_TOKEN) or the "
                "file serving.token_file (`--token-env`, `--token-file`).",
                name,
                details,
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnavailable(f"no answer within {self.timeout:g} s. Fix: raise the timeout.", name, details)
        hint = (
            " The input is probably longer than the model's context: set truncate_input_tokens."
            if "index out of range" in details
            else ""
        )
        return ModelServerError(f"gRPC {name}: {details}.{hint}", name, details)

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
    """A client for the served model; unset arguments come from ``recipe.serving`` (token: :func:`read_token`).

    Args:
        recipe: a :class:`detox_sft.config.Recipe` (or `None`: defaults, token from ``MODEL_TOKEN``).
        url: HTTP base URL (caikit or vLLM).
        grpc_target: ``host:port``; given (and ``kind`` caikit), the gRPC client is returned. Plaintext for
            ``grpc://host:port`` or a bare loopback ``host:port`` (the local runtime), TLS for ``grpcs://`` and any
            other host (see :class:`CaikitGrpcClient`); the HTTP URL's scheme has no say.
        kind: ``caikit`` or ``vllm``.
        token: bearer token; `None` reads ``recipe.serving.token_file`` or the variable ``recipe.serving.token_env``.
        ca_bundle, verify, timeout: TLS and time limits (default: the recipe's).
        retries: extra attempts on 502-504 / UNAVAILABLE / refused connections.

    Returns:
        A :class:`CaikitHttpClient`, :class:`CaikitGrpcClient` or :class:`VllmClient`.

    Raises:
        InsecureTokenError: the token would travel in plaintext to a host other than this machine.
    """

    cfg = recipe.serving if recipe is not None else ServingConfig()
    if grpc_target is None and url is None:
        grpc_target = cfg.grpc_target
    url = url or cfg.url
    token = token if token is not None else read_token(cfg)
    verify = cfg.verify_tls if verify is None else verify
    ca_bundle = ca_bundle or cfg.ca_bundle
    timeout = timeout or cfg.timeout
    if kind not in ("caikit", "vllm"):
        raise ValueError(f"kind: got {kind!r}. Fix: use 'caikit' or 'vllm'.")
    if kind == "caikit" and grpc_target:
        return CaikitGrpcClient(
            grpc_target,
            token=token,
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
