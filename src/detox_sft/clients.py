"""Clients for the served model: caikit HTTP, caikit gRPC, and vLLM's OpenAI-compatible API (the ``openai`` client).

Usage::

    client = connect(recipe, url="https://opt-350m-detox.apps.example.com")  # token from $MODEL_TOKEN
    client.generate_text("opt-350m-detox", generation_prompt("you are"), max_new_tokens=20)

A bearer token goes only over TLS or to this machine (:func:`check_token`) and is never shown; failures raise a
:class:`ModelServerError` kind with the server's message.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import re
import ssl
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from detox_sft.config import ServingConfig

CAIKIT_TEXT_GENERATION = "/api/v1/task/text-generation"
CAIKIT_STREAMING = "/api/v1/task/server-streaming-text-generation"
GRPC_SERVICE = "caikit.runtime.Nlp.NlpService"
# a bearer token as RFC 6750 writes it (b64token): anything else would end up echoed in a library's header error
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# gRPC's codes as the HTTP statuses the caikit runtime answers for the same failures
_GRPC_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
_GRPC_STATUS["UNAVAILABLE"] = 503


class ModelServerError(RuntimeError):
    """The server answered with an error (or not at all); ``status`` is the HTTP status or gRPC code name."""

    def __init__(self, message: str, status: int | str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


class ModelNotFound(ModelServerError):
    """No model with this id is served."""


class BadRequest(ModelServerError):
    """The server rejected the request; ``detail`` holds its explanation."""


class Unauthorized(ModelServerError):
    """The bearer token is missing, wrong or lacks the right to call the model."""


class ServerUnavailable(ModelServerError):
    """The server could not be reached (refused, 503, timeout, dropped) within the retries."""


class StreamingNotSupported(ModelServerError):
    """The served model cannot stream (caikit-nlp's local module)."""


class InsecureTokenError(ValueError):
    """A bearer token would go without TLS to another machine; raised before any connection."""


def _timeout(where: str, seconds: float) -> ServerUnavailable:
    message = f"{where} did not answer within {seconds:g} s. Fix: check the server, or raise the timeout."
    return ServerUnavailable(message, "timeout")


def _unexpected(detail: str, where: str) -> ModelServerError:
    return ModelServerError(f"unexpected {where} response: {detail}. Fix: check --url and --kind.", None, detail)


def _unreachable(where: str, attempts: int, reason: str) -> ServerUnavailable:
    message = f"cannot connect to {where} after {attempts} attempts ({reason}). Fix: check the server and URL."
    return ServerUnavailable(message, 503, reason)


@dataclass
class GenerationParams:
    """Generation parameters of every client, by caikit's names."""

    max_new_tokens: int = 20
    min_new_tokens: int | None = None
    decoding: str = "greedy"
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    truncate_input_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.decoding not in ("greedy", "sampling"):
            raise ValueError(f"decoding: got {self.decoding!r}. Fix: use 'greedy' or 'sampling'.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: got {self.max_new_tokens!r}. Fix: use a whole number >= 1.")

    def caikit(self) -> dict[str, Any]:
        """The caikit ``parameters`` (HTTP) / request fields (gRPC)."""
        values = {k: v for k, v in asdict(self).items() if v is not None and k != "decoding"}
        # the local module echoes the input by default, the TGIS module does not: ask both for the new text only
        return {**values, "decoding_method": self.decoding.upper(), "preserve_input_text": False}

    def openai(self) -> dict[str, Any]:
        """Keyword arguments of ``openai.OpenAI().completions.create`` (vLLM's own in ``extra_body``)."""
        sampling = self.decoding == "sampling"
        values: dict[str, Any] = {"max_tokens": self.max_new_tokens, "seed": self.seed}
        values.update({"temperature": self.temperature, "top_p": self.top_p} if sampling else {"temperature": 0.0})
        extra = {"top_k": self.top_k if sampling else None, "min_tokens": self.min_new_tokens}
        extra["truncate_prompt_tokens"] = self.truncate_input_tokens
        values["extra_body"] = {k: v for k, v in extra.items() if v is not None} or None
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class GenerationResult:
    """One generation: the new text only, and what the server said about it."""

    text: str
    generated_tokens: int | None = None
    finish_reason: str | None = None
    input_token_count: int | None = None


def _check_input(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("empty input text. Fix: give the prompt to continue.", 400, "empty input")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: ``localhost``, 127.0.0.0/8 or ::1."""
    name = host.strip().strip("[]").rstrip(".").lower() if isinstance(host, str) else ""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:  # a name other than localhost may resolve anywhere
        return name == "localhost"
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _check_token(token: str | None, tls: bool, host: str, where: str) -> str | None:
    if token is None or token == "":
        return None
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        problem = "the token holds characters a token cannot have (spaces, non-ASCII)"
        raise ValueError(f"{problem}. Fix: store the token alone.")
    if not tls and not is_loopback(host):
        message = f"refusing to send the bearer token in plaintext to {where}. Fix: use the server's TLS endpoint."
        raise InsecureTokenError(message)
    return token


def check_token(token: str | None, url: str) -> str | None:
    """``token`` if it may go to ``url`` (https, or this machine), else :class:`InsecureTokenError`; `None` for none.

    Call it before sending a bearer token by hand; a malformed URL or token raises `ValueError`."""
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        fix = "give the server's base URL, e.g. https://host or http://127.0.0.1:8080"
        raise ValueError(f"url: got {url!r}. Fix: {fix}.")
    return _check_token(token, parsed.scheme == "https", parsed.hostname or "", url.rstrip("/"))


def read_token(serving: ServingConfig | None = None) -> str | None:
    """The token in ``token_file`` if set (`ValueError` if unreadable or empty), else ``$token_env`` or None."""
    cfg = serving if serving is not None else ServingConfig()
    if not cfg.token_file:
        return os.environ.get(cfg.token_env, "").strip() or None if cfg.token_env else None
    path = Path(cfg.token_file).expanduser()
    try:
        token, problem = path.read_text(encoding="utf-8").strip(), f"{path} is empty"
    except (OSError, UnicodeDecodeError) as exc:
        token, problem = "", f"cannot read {path} ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'})"
    if not token:
        fix = f"write the token into it, or unset token_file to use ${cfg.token_env}"
        raise ValueError(f"serving.token_file: {problem}. Fix: {fix}.")
    return token


def _redact(text: str, token: str | None) -> str:
    # a server (or a proxy) may echo the request's headers in its error body; a string this short is no real
    # token (a service-account token has hundreds of characters) and would mangle ordinary words
    return text.replace(token, "<token>") if token and len(token) >= 8 and isinstance(text, str) else text


def _snippet(value: Any, limit: int = 300) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(body: Any, what: str) -> Any:
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON (a proxy's HTML page, a login form), or absurdly nested
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
        detail = _snippet(text.strip(), 200)
        message = f"{what}: the server did not answer JSON ({detail!r}). Fix: check the URL and --kind."
        raise ModelServerError(message, None, detail) from None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_caikit_result(body: Any) -> GenerationResult:
    """A caikit text-generation answer (body or decoded JSON) as a result; :class:`ModelServerError` if malformed."""
    data = _json(body, "caikit text generation")
    if not isinstance(data, dict) or not isinstance(data.get("generated_text", ""), str):
        raise _unexpected(_snippet(data), "caikit")
    text, reason = data.get("generated_text", ""), data.get("finish_reason")
    tokens, inputs = (_count(data.get(k)) for k in ("generated_tokens", "input_token_count"))
    return GenerationResult(text, tokens, reason if isinstance(reason, str) else None, inputs)


def parse_sse(lines: Iterable[bytes | str] | bytes | str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` of an SSE stream; :class:`ModelServerError` for a ``data:`` that is no JSON object."""
    lines = lines.decode("utf-8", "replace") if isinstance(lines, (bytes, bytearray)) else lines
    if isinstance(lines, str):  # SSE breaks lines at CR, LF and CRLF only (str.splitlines knows more breaks)
        lines = re.split(r"\r\n|\r|\n", lines)
    event = "message"
    for line in lines:
        line = line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray)) else line
        if not isinstance(line, str):
            raise _unexpected(_snippet(line), "stream line")
        line = line.rstrip("\r\n")
        if not line:
            event = "message"
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data = _json(line[len("data:") :].strip(), "stream event")
            if not isinstance(data, dict):
                raise _unexpected(_snippet(data), "stream event")
            yield event, data


def error_detail(body: Any) -> str:
    """The server's explanation in an error body, at most 500 characters. Never raises."""
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


def _status_error(status: int, detail: str, where: str, attempts: int) -> ModelServerError:
    if status in (401, 403):
        detail = detail or "unauthorized"
        fix = "give a valid token (serving.token_env or serving.token_file)"
        return Unauthorized(f"{where}: {status} {detail}. Fix: {fix}.", status, detail)
    if status == 404 and detail == "Not Found":  # FastAPI's own 404: the path is wrong, not the model id
        message = f"{where}: no such endpoint. Fix: check --url (the base URL) and --kind."
        return ModelServerError(message, status, detail)
    if status == 404:
        detail = detail or "model not found"
        fix = "use the served model id (GET /info/models lists them)"
        return ModelNotFound(f"{detail} ({where}). Fix: {fix}.", status, detail)
    if status in (400, 422):
        return BadRequest(f"bad request: {detail}", status, detail)
    if status in (502, 503, 504):
        detail = detail or str(status)
        message = f"{where} unavailable after {attempts} attempts: {detail}. Fix: retry once the server is up."
        return ServerUnavailable(message, status, detail)
    if "index out of range" in detail or "maximum context length" in detail:
        fix = "Input too long? Fix: set truncate_input_tokens."
        return ModelServerError(f"{where}: server error {status}: {detail}. {fix}", status, detail)
    return ModelServerError(f"{where}: server error {status}: {detail}.", status, detail)


def _trust_env(url: str) -> bool:
    # not for plaintext to this machine: a proxy would carry the request (token and all) off it
    parsed = urlparse(url)
    return not (parsed.scheme == "http" and is_loopback(parsed.hostname or ""))


class _Client(contextlib.AbstractContextManager):
    """Settings (``timeout`` and ``backoff`` in seconds; ``retries``: the library's), ``generate_text``, a context
    manager, a repr that hides the token (sent only as :func:`check_token` allows)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        verify: bool = True,
        timeout: float = 60.0,
        retries: int = 3,
        ca_bundle: str | os.PathLike[str] | None = None,
        backoff: float = 0.5,
    ) -> None:
        self.timeout, self.retries, self.backoff, self.verify = timeout, max(0, int(retries)), backoff, verify
        self.ca_bundle = str(ca_bundle) if (ca_bundle and verify) else None
        self._open(url, token)

    def generate_text(self, model_id: str, text: str, **params: Any) -> str:
        """Like ``generate``, returning the text only."""
        return self.generate(model_id, text, **params).text  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        token = "<set>" if self._token else None
        return f"{type(self).__name__}({self.url!r}, token={token}, timeout={self.timeout:g})"

    def close(self) -> None:
        """Close the connections."""
        self._pool.close()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class CaikitHttpClient(_Client):
    """The caikit runtime's HTTP API: a ``requests`` session with urllib3's ``Retry`` (settings of :class:`_Client`)."""

    def _open(self, url: str, token: str | None) -> None:
        self._token = check_token(token, url)
        self.url = url.rstrip("/")
        # resent: refused connections (the request never left) and 502-504 (generation changes nothing on the server);
        # not a request dropped after it went out (the server may have run it); the last 5xx is raised with its detail
        retry = Retry(
            total=self.retries,
            read=False,
            other=0,
            allowed_methods=frozenset({"GET", "POST"}),
            status_forcelist=(502, 503, 504),
            backoff_factor=self.backoff,
            retry_after_max=max(1, int(self.timeout)),
            raise_on_status=False,
        )
        self.session = self._pool = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.session.headers["Accept"] = "application/json"
        if self._token:
            self.session.headers["Authorization"] = f"Bearer {self._token}"
        self.session.trust_env = _trust_env(url)
        self.session.verify = self.ca_bundle or self.verify
        if not self.verify:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def _connection_error(self, exc: Exception, url: str, stream: bool = False) -> ServerUnavailable:
        """The error for a refused, timed-out (a stream's read) or dropped connection to ``url``."""
        inner = exc.args[0] if exc.args else exc
        if isinstance(inner, urllib3.exceptions.MaxRetryError):
            reason = _snippet(str(inner.reason or inner), 200)
            return _unreachable(self.url, self.retries + 1, reason)
        if stream and isinstance(inner, urllib3.exceptions.ReadTimeoutError):
            return _timeout(f"the stream from {self.url}", self.timeout)
        detail = _snippet(str(exc), 200)
        message = f"{url}: connection closed before an answer ({detail}); not resent (the server may have run it). "
        return ServerUnavailable(message + "Fix: check the server, then retry.", "disconnected", detail)

    def _post(self, path: str, body: dict[str, Any], stream: bool = False):
        url = f"{self.url}{path}"
        try:
            resp = self.session.post(url, json=body, timeout=self.timeout, stream=stream)
        except requests.exceptions.SSLError as exc:
            fix = "pass the CA bundle (--ca-bundle), or --insecure"
            message = f"TLS verification failed for {self.url}: {exc}. Fix: {fix}."
            raise ModelServerError(message, None, str(exc)) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise _timeout(url, self.timeout) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise self._connection_error(exc, url) from exc
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            detail = f"{type(exc).__name__}: {_snippet(str(exc))}"
            raise ModelServerError(f"{url}: the request failed ({detail}).", None, detail) from exc
        if resp.status_code >= 400:
            retry = getattr(resp.raw, "retries", None)
            attempts = len(retry.history) + 1 if retry is not None else 1
            detail = _redact(error_detail(resp.content), self._token)
            raise _status_error(resp.status_code, detail, resp.url, attempts)
        return resp

    def generate(self, model_id: str, text: str, params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``)."""
        p = replace(params or GenerationParams(), **kw)
        resp = self._post(CAIKIT_TEXT_GENERATION, {"model_id": model_id, "inputs": text, "parameters": p.caikit()})
        return parse_caikit_result(resp.content)

    def generate_stream(
        self, model_id: str, text: str, params: GenerationParams | None = None, fallback: bool = False, **overrides: Any
    ) -> Iterator[str]:
        """Stream the continuation; with ``fallback``, a model that cannot stream yields ``generate``'s text once."""
        _check_input(text)
        p = replace(params or GenerationParams(), **overrides)
        body = {"model_id": model_id, "inputs": text, "parameters": p.caikit()}
        sent = False
        with self._post(CAIKIT_STREAMING, body, stream=True) as resp:
            try:
                for event, data in parse_sse(resp.iter_lines()):
                    if event == "error":
                        code = data.get("code") if isinstance(data.get("code"), int) else 500
                        detail = _redact(str(data.get("details", data)), self._token)
                        if not sent and code >= 500 and fallback:
                            yield self.generate(model_id, text, p).text
                            return
                        if not sent and code >= 500:
                            message = f"{model_id!r} cannot stream ({detail}). Fix: use generate(), or fallback=True."
                            raise StreamingNotSupported(message, code, detail)
                        cls = {404: ModelNotFound, 400: BadRequest, 422: BadRequest}.get(code, ModelServerError)
                        raise cls(f"streaming failed: {detail}", code, detail)
                    piece = data.get("generated_text", "")
                    if piece and isinstance(piece, str):
                        sent = True
                        yield piece
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                raise self._connection_error(exc, f"{self.url}{CAIKIT_STREAMING}", stream=True) from exc


class VllmClient(_Client):
    """vLLM's OpenAI-compatible API (``/v1/completions``) by the ``openai`` client (settings of :class:`_Client`)."""

    def _open(self, url: str, token: str | None) -> None:
        import httpx2
        import openai

        self._token = check_token(token, url)
        self.url = url.rstrip("/").removesuffix("/v1")
        http = httpx2.Client(verify=self.ca_bundle or self.verify, trust_env=_trust_env(url))
        # api_key is passed explicitly: left None, openai would read $OPENAI_API_KEY and send it to this URL
        self.openai = self._pool = openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=self._token or "-",
            max_retries=self.retries,
            timeout=self.timeout,
            http_client=http,
        )
        # no token: omit the header openai would build from the placeholder key
        self._headers = {} if self._token else {"Authorization": openai.Omit()}

    def generate(self, model_id: str, text: str, params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        """Complete ``text`` with the served model ``model_id``."""
        import openai

        _check_input(text)
        p = replace(params or GenerationParams(), **kw)
        where = f"{self.url}/v1/completions"
        try:
            completion = self.openai.completions.create(
                model=model_id, prompt=text, extra_headers=self._headers, **p.openai()
            )
        except openai.APIStatusError as exc:  # raised below, outside this handler: its text may echo the token
            retried = exc.response.request.headers.get("x-stainless-retry-count", "0")
            detail = _redact(error_detail(exc.response.content), self._token)
            error: ModelServerError = _status_error(exc.status_code, detail, where, int(retried) + 1)
        except openai.APITimeoutError:
            error = _timeout(where, self.timeout)
        except openai.APIConnectionError as exc:
            reason, attempts = _snippet(_redact(str(exc.__cause__ or exc), self._token), 200), self.retries + 1
            error = _unreachable(self.url, attempts, reason)
        except openai.APIError as exc:  # e.g. a 200 answer that is not JSON
            detail = _snippet(_redact(str(exc), self._token))
            error = ModelServerError(f"{where}: the request failed ({detail}).", None, detail)
        else:
            # openai builds its models without validating them: a malformed answer shows as a missing attribute
            with contextlib.suppress(AttributeError, IndexError, TypeError, KeyError):
                choice, usage = completion.choices[0], completion.usage
                if isinstance(choice.text, str):
                    tokens = (_count(getattr(usage, k, None)) for k in ("completion_tokens", "prompt_tokens"))
                    reason = choice.finish_reason if isinstance(choice.finish_reason, str) else None
                    return GenerationResult(choice.text, next(tokens), reason, next(tokens))
            detail = _snippet(completion.model_dump(warnings=False))
            error = _unexpected(detail, where)
        raise error


class CaikitGrpcClient(_Client):
    """The caikit runtime's gRPC API by reflection; ``target`` is ``host:port`` (plaintext to this machine, else TLS),
    ``grpc://`` or ``grpcs://``, unless ``plaintext`` says otherwise."""

    def __init__(self, target: str, *, plaintext: bool | None = None, **settings: Any) -> None:
        self.plaintext = plaintext
        super().__init__(target, **settings)

    def _open(self, target: str, token: str | None) -> None:
        import grpc

        scheme, sep, rest = str(target).rpartition("://")
        host, _, port = rest.rpartition(":")
        if (sep and scheme not in ("grpc", "grpcs", "http", "https")) or not host or not port.isdigit():
            fix = "give host:port, grpc://host:port or grpcs://host:port"
            raise ValueError(f"grpc target: got {target!r}. Fix: {fix}.")
        plaintext = scheme in ("grpc", "http") if sep and self.plaintext is None else self.plaintext
        self.url = f"{host}:{port}"
        self.plaintext = is_loopback(host) if plaintext is None else bool(plaintext)
        self._token = _check_token(token, not self.plaintext, host, self.url)
        if self.plaintext and not self._token:
            self.channel = self._pool = grpc.insecure_channel(self.url, self._options())
            return
        if self.plaintext:
            # to this machine only (checked above): local credentials let gRPC attach call credentials without TLS,
            # and gRPC itself refuses them for a peer that is not on this machine
            creds = grpc.local_channel_credentials()
        else:
            root = Path(self.ca_bundle).read_bytes() if self.ca_bundle else None
            if not self.verify:
                root = ssl.get_server_certificate((host.strip("[]"), int(port))).encode()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
        if self._token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self._token))
        self.channel = self._pool = grpc.secure_channel(self.url, creds, self._options())

    def _options(self) -> list[tuple[str, Any]]:
        method: dict[str, Any] = {
            "name": [{"service": GRPC_SERVICE}, {"service": "grpc.reflection.v1alpha.ServerReflection"}],
            "timeout": f"{self.timeout:.3f}s",  # reflection calls (inside protobuf's descriptor pool) get one too
        }
        if self.retries:
            method["retryPolicy"] = {
                "maxAttempts": min(self.retries + 1, 5),  # gRPC caps attempts at 5
                "initialBackoff": f"{max(self.backoff, 0.001):.3f}s",  # gRPC jitters each backoff by +-20 %
                "maxBackoff": "30s",
                "backoffMultiplier": 2,
                # refused, reset, server (re)starting; not INTERNAL, the failure of this very input
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return [
            ("grpc.enable_retries", int(self.retries > 0)),
            ("grpc.service_config", json.dumps({"methodConfig": [method]})),
            # reconnect as soon as a retry is due (by default a refused connection is next tried after 1 s)
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.backoff * 1000))),
        ]

    @functools.cached_property
    def _stubs(self) -> tuple[Any, Any]:
        from google.protobuf.descriptor_pool import DescriptorPool
        from google.protobuf.message_factory import GetMessageClass
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        names = ("caikit.runtime.Nlp.TextGenerationTaskRequest", "caikit_data_model.nlp.GeneratedTextResult")
        found: Future = Future()

        def lookup() -> None:
            try:
                found.set_result([GetMessageClass(pool.FindMessageTypeByName(name)) for name in names])
            except Exception as exc:  # re-raised in the caller's thread
                found.set_exception(exc)

        # grpc_reflection's stream carries no deadline (the service config's timeout did not end it when the
        # server died mid-handshake behind a proxy), so the lookup is bounded here; closing the channel cancels it
        threading.Thread(target=lookup, daemon=True).start()
        try:
            req, res = found.result(self.timeout)
        except TimeoutError:
            self.channel.close()
            raise _timeout(self.url, self.timeout) from None
        except KeyError as exc:
            message = f"{self.url} does not serve caikit's text generation ({exc}). Fix: check the gRPC target."
            raise ModelServerError(message, None, str(exc)) from exc
        method, serialize = f"/{GRPC_SERVICE}/TextGenerationTaskPredict", req.SerializeToString
        return req, self.channel.unary_unary(method, request_serializer=serialize, response_deserializer=res.FromString)

    def _call(self, fn):
        import grpc

        try:
            return fn()  # retried by the channel's retryPolicy
        except grpc.RpcError as exc:
            name = getattr(exc.code(), "name", "UNKNOWN") if hasattr(exc, "code") else "UNKNOWN"
            details = _redact((exc.details() if hasattr(exc, "details") else str(exc)) or "", self._token)
        # raised outside the handler: our message has the code and the (redacted) details, the RpcError is not kept
        if name == "DEADLINE_EXCEEDED":
            raise _timeout(self.url, self.timeout)
        status = _GRPC_STATUS.get(name, 500)
        attempts = min(self.retries + 1, 5) if status == 503 else 1  # gRPC caps attempts at 5
        error = _status_error(status, details, f"gRPC {name} from {self.url}", attempts)
        error.status = name
        raise error

    def generate(self, model_id: str, text: str, params: GenerationParams | None = None, **kw: Any) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``)."""
        # an empty text is refused here: gRPC cannot tell it from an unset field (HTTP answers 400)
        from google.protobuf.json_format import MessageToDict

        _check_input(text)
        p = replace(params or GenerationParams(), **kw)
        request_type, predict = self._call(lambda: self._stubs)
        fields = {f.name for f in request_type.DESCRIPTOR.fields}
        request = request_type(text=text, **{k: v for k, v in p.caikit().items() if k in fields})
        response = self._call(lambda: predict(request, metadata=[("mm-model-id", model_id)], timeout=self.timeout))
        raw = MessageToDict(response, preserving_proto_field_name=True)  # 64-bit counts come back as strings
        counts = {"generated_tokens": response.generated_tokens, "input_token_count": response.input_token_count}
        return parse_caikit_result({**raw, "generated_text": response.generated_text, **counts})


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
):
    """A client for the served model (gRPC when ``grpc_target`` is set), unset arguments from ``recipe.serving``."""
    cfg = recipe.serving if recipe is not None else ServingConfig()
    if grpc_target is None and url is None:
        grpc_target = cfg.grpc_target
    url = url or cfg.url
    if kind not in ("caikit", "vllm"):
        raise ValueError(f"kind: got {kind!r}. Fix: use 'caikit' or 'vllm'.")
    settings = {
        "token": token if token is not None else read_token(cfg),
        "verify": cfg.verify_tls if verify is None else verify,
        "ca_bundle": ca_bundle or cfg.ca_bundle,
        "timeout": timeout or cfg.timeout,
    }
    if kind == "caikit" and grpc_target:
        return CaikitGrpcClient(grpc_target, **settings)
    if not url:
        raise ValueError("no server URL. Fix: pass --url (or set serving.url in the recipe).")
    return (VllmClient if kind == "vllm" else CaikitHttpClient)(url, **settings)
