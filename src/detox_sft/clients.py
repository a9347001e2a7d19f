"""Clients for the served model: caikit HTTP, caikit gRPC, and vLLM's OpenAI-compatible API (the ``openai`` client).

Usage::

    client = connect(recipe, url="https://opt-350m-detox.apps.example.com")  # token from $MODEL_TOKEN
    client.generate_text("opt-350m-detox", generation_prompt("you are"), max_new_tokens=20)

A bearer token travels only over TLS or to this machine (:func:`check_token`, which a hand-written request calls too),
is read from a variable or a file (:func:`read_token`), never from the command line, and never shown. Retries are the
libraries' own (urllib3's ``Retry``, gRPC's ``retryPolicy``, openai's ``max_retries``); failures raise a
:class:`ModelServerError` kind with the server's own message.
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

CAIKIT_TEXT_GENERATION = "/api/v1/task/text-generation"
CAIKIT_STREAMING = "/api/v1/task/server-streaming-text-generation"
GRPC_SERVICE = "caikit.runtime.Nlp.NlpService"
# a bearer token as RFC 6750 writes it (b64token): anything else would end up echoed in a library's header error
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# gRPC's codes as the HTTP statuses the caikit runtime answers for the same failures
_GRPC_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
_GRPC_STATUS["UNAVAILABLE"] = 503
_SERVER_FIX = "`detox-sft-dev serve`, or `oc get inferenceservice`"
# Every message the clients raise, by kind; each says what went wrong and what to do.
_MESSAGES = {
    "token_chars": "the bearer token holds characters a token cannot have (spaces, quotes, line breaks, non-ASCII). "
    "Fix: put only the token in the variable or file (`oc create token <service-account>` prints one).",
    "plaintext": "refusing to send the bearer token to {where} in plaintext: anyone on the way could read and reuse "
    "it. Fix: use the server's TLS endpoint (an https:// URL; for gRPC a grpcs:// target or plaintext=False), or send "
    "no token. Plaintext with a token is allowed only to this machine (127.0.0.1, ::1, localhost).",
    "url": "url: got {where!r}. Fix: give the server's base URL, e.g. https://host or http://127.0.0.1:8080.",
    "target": "grpc target: got {where!r}. Fix: give host:port, grpc://host:port (plaintext) or grpcs://host:port "
    "(TLS), e.g. 127.0.0.1:8085.",
    "no_url": "no server URL. Fix: pass --url (or set serving.url in the recipe); on OpenShift AI: "
    "`oc get inferenceservice <name> -o jsonpath='{{.status.url}}'`.",
    "token_file": "serving.token_file: {problem}. Fix: write the token into it (`oc create token "
    "<service-account> > {where}`), or unset token_file to use ${env}.",
    "kind": "kind: got {where!r}. Fix: use 'caikit' or 'vllm'.",
    "empty": "empty input text. Fix: give the prompt to continue.",
    "not_json": "{where}: the server did not answer JSON ({detail!r}). Fix: check the URL (a proxy or a login page "
    "answers HTML) and --kind.",
    "unexpected": "unexpected {where} response: {detail}. Fix: check --url and --kind (vLLM answers /v1/completions).",
    "unauthorized": "{where}: {status} {detail}. Fix: give a valid token in the variable serving.token_env "
    "(MODEL_TOKEN) or the file serving.token_file (`--token-env`, `--token-file`): `oc create token "
    "<service-account>`, or the token in the model's details.",
    "no_endpoint": "{where}: no such endpoint. Fix: check --url (the base URL) and --kind.",
    "not_found": "{detail} ({where}). Fix: use the served model id (the caikit folder name, the InferenceService "
    "name; GET /info/models lists them).",
    "bad_request": "bad request: {detail}",
    "unavailable": "{where} unavailable after {attempts} attempts: {detail}. Fix: the server is (re)starting or "
    f"overloaded: check {_SERVER_FIX}, retry later.",
    "server_error": "{where}: server error {status}: {detail}.",
    "too_long": "{where}: server error {status}: {detail}. The input is probably longer than the model's context: "
    "set truncate_input_tokens.",
    "unreachable": "cannot connect to {where} after {attempts} attempts ({detail}). Fix: check that the server runs "
    f"({_SERVER_FIX}) and that the URL is right.",
    "timeout": "{where} did not answer within {seconds:g} s. Fix: check the server, or raise the timeout.",
    "dropped": "{where}: the connection closed before the server answered ({detail}); the request was not resent, as "
    f"the server may have run it (or died of it). Fix: check the server's state and log ({_SERVER_FIX}), then retry.",
    "tls": "TLS verification failed for {where}: {detail}. Fix: pass the cluster's CA bundle (--ca-bundle / "
    "ca_bundle=), or --insecure for a throwaway test cluster only.",
    "failed": "{where}: the request failed ({detail}).",
    "no_stream": "the server could not stream {where!r} ({detail}): caikit-nlp's local module does not stream (the "
    "TGIS-backed runtime does). Fix: use generate(), or fallback=True.",
    "stream_failed": "streaming failed: {detail}",
    "no_caikit": "{where} does not serve caikit's text generation ({detail}). Fix: check the gRPC target.",
}


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
    """The server could not be reached (refused, 503, timeout, dropped) within the bounded retries."""


class StreamingNotSupported(ModelServerError):
    """The served model cannot stream (caikit-nlp's local module); the TGIS-backed runtime can."""


class InsecureTokenError(ValueError):
    """A bearer token would be sent without TLS to a host other than this machine; raised before any connection."""


def _error(cls: type[Exception], kind: str, status: Any = None, detail: str | None = None, **values: Any):
    """An exception of class ``cls`` with the message ``_MESSAGES[kind]``."""
    message = _MESSAGES[kind].format(status=status, detail=detail, **values)
    return cls(message, status, detail) if issubclass(cls, ModelServerError) else cls(message)


@dataclass
class GenerationParams:
    """Generation parameters of every client, by caikit's names; ``truncate_input_tokens`` keeps the last N tokens."""

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
        """The caikit ``parameters`` (HTTP) / request fields (gRPC)."""
        values = {k: v for k, v in asdict(self).items() if v is not None and k != "decoding"}
        values["decoding_method"] = self.decoding.upper()
        # the local module echoes the input by default, the TGIS module does not: ask both for the new text only
        values["preserve_input_text"] = False
        return values

    def openai(self) -> dict[str, Any]:
        """Keyword arguments of ``openai.OpenAI().completions.create``; vLLM's own fields go in ``extra_body``."""
        sampling = self.decoding == "sampling"
        values: dict[str, Any] = {"max_tokens": self.max_new_tokens, "seed": self.seed}
        values.update({"temperature": self.temperature, "top_p": self.top_p} if sampling else {"temperature": 0.0})
        extra = {
            "top_k": self.top_k if sampling else None,
            "min_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "truncate_prompt_tokens": self.truncate_input_tokens,
        }
        values["extra_body"] = {k: v for k, v in extra.items() if v is not None} or None
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class GenerationResult:
    """One generation: the new text only (the prompt is not repeated), and what the server said about it."""

    text: str
    generated_tokens: int | None = None
    finish_reason: str | None = None
    input_token_count: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _params(params: GenerationParams | None, overrides: dict[str, Any]) -> GenerationParams:
    return GenerationParams(**{**(asdict(params) if params else {}), **overrides})


def _check_input(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise _error(BadRequest, "empty", 400, "empty input")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: ``localhost``, 127.0.0.0/8 or ::1 (IPv6 with or without brackets)."""
    name = host.strip().strip("[]").rstrip(".").lower() if isinstance(host, str) else ""
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
    if token is None or token == "":
        return None
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise _error(ValueError, "token_chars")
    if not tls and not is_loopback(host):
        raise _error(InsecureTokenError, "plaintext", where=where)
    return token


def check_token(token: str | None, url: str) -> str | None:
    """The rule every client applies: ``token`` goes over TLS (https) or to this machine only; call it before sending
    a bearer token by hand. Returns the token, or `None` for none (send no header).

    Raises:
        InsecureTokenError: ``url`` is plain ``http://`` to a host other than this machine.
        ValueError: ``url`` is not an http(s) URL, or the token holds characters a bearer token cannot have.
    """
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _error(ValueError, "url", where=url)
    return _check_token(token, parsed.scheme == "https", parsed.hostname or "", url.rstrip("/"))


def read_token(serving: ServingConfig | None = None) -> str | None:
    """The bearer token of ``serving``: the file ``token_file`` when set, else the variable ``token_env`` (`None` when
    unset or empty).

    Raises:
        ValueError: ``token_file`` is set but cannot be read, or is empty.
    """
    cfg = serving if serving is not None else ServingConfig()
    if not cfg.token_file:
        return os.environ.get(cfg.token_env, "").strip() or None if cfg.token_env else None
    path = Path(cfg.token_file).expanduser()
    try:
        token, problem = path.read_text(encoding="utf-8").strip(), f"{path} is empty"
    except (OSError, UnicodeDecodeError) as exc:
        token, problem = "", f"cannot read {path} ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'})"
    if not token:
        raise _error(ValueError, "token_file", where=path, problem=problem, env=cfg.token_env)
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
    """``body`` (bytes or str off the wire) decoded as JSON; anything else is taken as already decoded."""
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON (a proxy's HTML page, a login form), or absurdly nested
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
        raise _error(ModelServerError, "not_json", detail=_snippet(text.strip(), 200), where=what) from None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_caikit_result(body: Any) -> GenerationResult:
    """A caikit text-generation answer (the HTTP body, or its decoded JSON) as a result; malformed counts are `None`.

    Raises:
        ModelServerError: the body is not JSON, or not an object whose ``generated_text`` (if any) is a string.
    """
    data = _json(body, "caikit text generation")
    if not isinstance(data, dict) or not isinstance(data.get("generated_text", ""), str):
        raise _error(ModelServerError, "unexpected", detail=_snippet(data), where="caikit")
    reason = data.get("finish_reason")
    return GenerationResult(
        data.get("generated_text", ""),
        _count(data.get("generated_tokens")),
        reason if isinstance(reason, str) else None,
        _count(data.get("input_token_count")),
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
            raise _error(ModelServerError, "unexpected", detail=_snippet(line), where="stream line")
        line = line.rstrip("\r\n")
        if not line:
            event = "message"
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data = _json(line[len("data:") :].strip(), "stream event")
            if not isinstance(data, dict):
                raise _error(ModelServerError, "unexpected", detail=_snippet(data), where="stream event")
            yield event, data


def error_detail(body: Any) -> str:
    """The server's explanation in an error body (caikit ``details``, FastAPI ``detail``, OpenAI ``error.message``),
    at most 500 characters; the body's text when it is not JSON. Never raises."""
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
    """The typed error for an HTTP error answer (caikit or vLLM); ``detail`` is already redacted."""
    if status in (401, 403):
        return _error(Unauthorized, "unauthorized", status, detail or "unauthorized", where=where)
    if status == 404 and detail == "Not Found":  # FastAPI's own 404: the path is wrong, not the model id
        return _error(ModelServerError, "no_endpoint", status, detail, where=where)
    if status == 404:
        return _error(ModelNotFound, "not_found", status, detail or "model not found", where=where)
    if status in (400, 422):
        return _error(BadRequest, "bad_request", status, detail)
    if status in (502, 503, 504):
        return _error(ServerUnavailable, "unavailable", status, detail or str(status), where=where, attempts=attempts)
    too_long = "index out of range" in detail or "maximum context length" in detail
    return _error(ModelServerError, "too_long" if too_long else "server_error", status, detail, where=where)


def _trust_env(url: str) -> bool:
    """Whether to honour HTTP_PROXY: not for plaintext to this machine, which a proxy would carry (token and all) off it."""
    parsed = urlparse(url)
    return not (parsed.scheme == "http" and is_loopback(parsed.hostname or ""))


def _unreachable(where: str, attempts: int, reason: str) -> ServerUnavailable:
    return _error(ServerUnavailable, "unreachable", 503, _snippet(reason, 200), where=where, attempts=attempts)


def _timeout(where: str, seconds: float) -> ServerUnavailable:
    return _error(ServerUnavailable, "timeout", "timeout", where=where, seconds=seconds)


def _dropped(where: str, exc: BaseException) -> ServerUnavailable:
    return _error(ServerUnavailable, "dropped", "disconnected", _snippet(str(exc), 200), where=where)


class _Client:
    """What every client shares: its settings, ``generate_text``, a context manager, a repr that hides the token.

    Args:
        url: base URL (``https://<inference service route>``, ``http://127.0.0.1:<port>``) or gRPC target.
        token: bearer token or `None`; sent only as :func:`check_token` allows.
        verify, ca_bundle: verify the server's TLS certificate, against this CA bundle when given.
        timeout: seconds per request.
        retries, backoff: the library's own retries (resent: refused connections, 502-504 / UNAVAILABLE); backoff
            in seconds (the ``openai`` client keeps its own).
    """

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
        self.timeout, self.retries, self.backoff, self.verify = timeout, max(0, int(retries)), backoff, verify
        self.ca_bundle = str(ca_bundle) if (ca_bundle and verify) else None
        self._open(url, token)

    def _open(self, url: str, token: str | None) -> None:
        raise NotImplementedError

    def generate_text(self, model_id: str, text: str, **params: Any) -> str:
        """Like ``generate``, returning the text only."""
        return self.generate(model_id, text, **params).text  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        token = "<set>" if self._token else None
        return f"{type(self).__name__}({self.url!r}, token={token}, timeout={self.timeout:g})"

    def close(self) -> None:
        """Close the connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class CaikitHttpClient(_Client):
    """The caikit runtime's HTTP API (``POST /api/v1/task/text-generation``) over a ``requests`` session, with
    urllib3's ``Retry``; arguments as for :class:`_Client`."""

    def _open(self, url: str, token: str | None) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util import Retry

        self._token = check_token(token, url)
        self.url = url.rstrip("/")
        retry = Retry(
            total=self.retries,
            connect=self.retries,  # refused / unreachable: the request never left, resending is safe
            read=False,  # dropped after the request went out: not resent (the server may have run it, or died of it)
            status=self.retries,
            other=0,
            # text generation changes nothing on the server: a POST answered 502-504 (restarting) is safe to resend
            allowed_methods=frozenset({"GET", "POST"}),
            status_forcelist=(502, 503, 504),
            backoff_factor=self.backoff,
            retry_after_max=max(1, int(self.timeout)),
            raise_on_status=False,  # the last 5xx comes back, to be raised with the server's own detail
        )
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.session.headers["Accept"] = "application/json"
        if self._token:
            self.session.headers["Authorization"] = f"Bearer {self._token}"
        # straight to this machine: a proxy from HTTP_PROXY would carry the plaintext request (token) off it
        self.session.trust_env = _trust_env(url)
        self.session.verify = self.ca_bundle or self.verify
        if not self.verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        """Close the connection pool."""
        self.session.close()

    def _post(self, path: str, body: dict[str, Any], stream: bool = False):
        import requests
        import urllib3

        url = f"{self.url}{path}"
        try:
            resp = self.session.post(url, json=body, timeout=self.timeout, stream=stream)
        except requests.exceptions.SSLError as exc:
            raise _error(ModelServerError, "tls", detail=str(exc), where=self.url) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise _timeout(url, self.timeout) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            inner = exc.args[0] if exc.args else exc
            if isinstance(inner, urllib3.exceptions.MaxRetryError):
                raise _unreachable(self.url, self.retries + 1, str(inner.reason or inner)) from exc
            raise _dropped(url, exc) from exc
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            detail = f"{type(exc).__name__}: {_snippet(str(exc))}"
            raise _error(ModelServerError, "failed", detail=detail, where=url) from exc
        if resp.status_code >= 400:
            retry = getattr(resp.raw, "retries", None)
            attempts = len(retry.history) + 1 if retry is not None else 1
            detail = _redact(error_detail(resp.content), self._token)
            raise _status_error(resp.status_code, detail, resp.url, attempts)
        return resp

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``); the server judges the input."""
        p = _params(params, overrides)
        resp = self._post(CAIKIT_TEXT_GENERATION, {"model_id": model_id, "inputs": text, "parameters": p.caikit()})
        return parse_caikit_result(resp.content)

    def generate_stream(
        self, model_id: str, text: str, params: GenerationParams | None = None, fallback: bool = False, **overrides: Any
    ) -> Iterator[str]:
        """Stream the continuation in pieces (server-sent events); with ``fallback``, a model that cannot stream
        (caikit-nlp's local module) yields the unary result once instead of raising :class:`StreamingNotSupported`."""
        import requests
        import urllib3

        _check_input(text)
        p = _params(params, overrides)
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
                            raise _error(StreamingNotSupported, "no_stream", code, detail, where=model_id)
                        cls = {404: ModelNotFound, 400: BadRequest, 422: BadRequest}.get(code, ModelServerError)
                        raise _error(cls, "stream_failed", code, detail)
                    piece = data.get("generated_text", "")
                    if piece and isinstance(piece, str):
                        sent = True
                        yield piece
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ReadTimeoutError):
                    raise _timeout(f"the stream from {self.url}", self.timeout) from exc
                raise _dropped(f"{self.url}{CAIKIT_STREAMING}", exc) from exc


class VllmClient(_Client):
    """vLLM's OpenAI-compatible API (``POST /v1/completions``) through the ``openai`` client, whose own retries resend
    connection failures, timeouts, 408/409/429 and 5xx. ``url`` may end in ``/v1``; no token sends no Authorization
    header (never ``$OPENAI_API_KEY``); arguments as for :class:`_Client`."""

    def _open(self, url: str, token: str | None) -> None:
        import httpx2
        import openai

        self._token = check_token(token, url)
        self.url = url.rstrip("/").removesuffix("/v1")
        http = httpx2.Client(verify=self.ca_bundle or self.verify, trust_env=_trust_env(url))
        # api_key is passed explicitly: left None, openai would read $OPENAI_API_KEY and send it to this URL
        self.openai = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self._token or "-", max_retries=self.retries,
            timeout=self.timeout, http_client=http,
        )  # fmt: skip
        # no token: omit the header openai would build from the placeholder key
        self._headers = {} if self._token else {"Authorization": openai.Omit()}

    def close(self) -> None:
        """Close the connection pool."""
        self.openai.close()

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Complete ``text`` with model ``model_id`` (the served model name)."""
        import openai

        _check_input(text)
        p = _params(params, overrides)
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
            error = _unreachable(self.url, self.openai.max_retries + 1, _redact(str(exc.__cause__ or exc), self._token))
        except openai.APIError as exc:  # e.g. a 200 answer that is not JSON
            error = _error(ModelServerError, "failed", detail=_snippet(_redact(str(exc), self._token)), where=where)
        else:
            # openai builds its models without validating them: a malformed answer shows as a missing attribute
            try:
                choice, usage = completion.choices[0], completion.usage
                if isinstance(choice.text, str):
                    tokens = (_count(getattr(usage, k, None)) for k in ("completion_tokens", "prompt_tokens"))
                    reason = choice.finish_reason if isinstance(choice.finish_reason, str) else None
                    return GenerationResult(choice.text, next(tokens), reason, next(tokens), completion.model_dump())
            except (AttributeError, IndexError, TypeError, KeyError):
                pass
            error = _error(
                ModelServerError, "unexpected", detail=_snippet(completion.model_dump(warnings=False)), where=where
            )
        raise error


class CaikitGrpcClient(_Client):
    """The caikit runtime's gRPC API (``caikit.runtime.Nlp.NlpService/TextGenerationTaskPredict``, ``mm-model-id``),
    message types by gRPC reflection; unlike caikit-nlp-client 0.0.8 it sends the bearer token and maps errors.

    Args:
        target: ``host:port`` (plaintext to a loopback host, else TLS), ``grpc://host:port`` (plaintext) or
            ``grpcs://host:port`` (TLS, verified against ``ca_bundle`` or the system roots).
        plaintext: overrides what the target says.
        verify: with ``False`` the server's own certificate is fetched and trusted (throwaway clusters only).
        **settings: as for :class:`_Client`; retries are gRPC's ``retryPolicy`` (at most 5 attempts in all).
    """

    def __init__(self, target: str, *, plaintext: bool | None = None, **settings: Any) -> None:
        self.plaintext = plaintext
        super().__init__(target, **settings)

    def _open(self, target: str, token: str | None) -> None:
        import grpc

        plaintext = self.plaintext
        scheme, sep, rest = target.partition("://") if isinstance(target, str) else ("", "", "")
        host, _, port = (rest if sep else target if isinstance(target, str) else "").rpartition(":")
        if (sep and scheme not in ("grpc", "grpcs", "http", "https")) or not host or not port.isdigit():
            raise _error(ValueError, "target", where=target)
        if sep and plaintext is None:
            plaintext = scheme in ("grpc", "http")
        self.url = f"{host}:{port}"
        self.plaintext = is_loopback(host) if plaintext is None else bool(plaintext)
        self._token = _check_token(token, not self.plaintext, host, self.url)
        self._stubs: tuple[Any, Any] | None = None
        if self.plaintext and not self._token:
            self.channel = grpc.insecure_channel(self.url, self._options())
            return
        if self.plaintext:
            # to this machine only (checked above): local credentials let gRPC attach call credentials without TLS,
            # and gRPC itself refuses them for a peer that is not on this machine
            creds = grpc.local_channel_credentials()
        else:
            root = Path(self.ca_bundle).read_bytes() if self.ca_bundle else None
            if not self.verify:
                import ssl

                root = ssl.get_server_certificate((host.strip("[]"), int(port))).encode()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
        if self._token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self._token))
        self.channel = grpc.secure_channel(self.url, creds, self._options())

    def _options(self) -> list[tuple[str, Any]]:
        """Channel options: a default deadline and gRPC's own retries (``retryPolicy``) for caikit and reflection."""
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

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _load_stubs(self) -> tuple[Any, Any]:
        if self._stubs is None:
            from google.protobuf.descriptor_pool import DescriptorPool
            from google.protobuf.message_factory import GetMessageClass
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
            try:
                req = GetMessageClass(pool.FindMessageTypeByName("caikit.runtime.Nlp.TextGenerationTaskRequest"))
                res = GetMessageClass(pool.FindMessageTypeByName("caikit_data_model.nlp.GeneratedTextResult"))
            except KeyError as exc:
                raise _error(ModelServerError, "no_caikit", detail=str(exc), where=self.url) from exc
            predict = self.channel.unary_unary(
                f"/{GRPC_SERVICE}/TextGenerationTaskPredict",
                request_serializer=req.SerializeToString,
                response_deserializer=res.FromString,
            )
            self._stubs = (req, predict)
        return self._stubs

    def _call(self, fn):
        import grpc

        try:
            return fn()  # retried by the channel's retryPolicy
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = _redact((exc.details() if hasattr(exc, "details") else str(exc)) or "", self._token)
        # raised outside the handler: our message has the code and the (redacted) details, the RpcError is not kept
        name = code.name if code is not None else "UNKNOWN"
        if name == "DEADLINE_EXCEEDED":
            raise _timeout(self.url, self.timeout)
        status = _GRPC_STATUS.get(name, 500)
        attempts = min(self.retries + 1, 5) if status == 503 else 1  # gRPC caps attempts at 5
        error = _status_error(status, details, f"gRPC {name} from {self.url}", attempts)
        error.status = name
        raise error

    def generate(
        self, model_id: str, text: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a continuation of ``text`` (keywords override ``params``). An empty ``text`` is refused here: gRPC
        cannot tell it from an unset field and would generate from nothing (HTTP answers 400)."""
        from google.protobuf.json_format import MessageToDict

        _check_input(text)
        p = _params(params, overrides)
        request_type, predict = self._call(self._load_stubs)
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
    retries: int = 3,
):
    """A client for the served model, unset arguments from ``recipe.serving`` (token: :func:`read_token`): gRPC when
    ``grpc_target`` is given (its TLS follows the target), else caikit HTTP or (``kind="vllm"``) vLLM for ``url``.

    Raises:
        InsecureTokenError: the token would travel in plaintext to a host other than this machine.
        ValueError: no URL, or an unknown ``kind``.
    """
    cfg = recipe.serving if recipe is not None else ServingConfig()
    if grpc_target is None and url is None:
        grpc_target = cfg.grpc_target
    url = url or cfg.url
    if kind not in ("caikit", "vllm"):
        raise _error(ValueError, "kind", where=kind)
    settings = {
        "token": token if token is not None else read_token(cfg),
        "verify": cfg.verify_tls if verify is None else verify,
        "ca_bundle": ca_bundle or cfg.ca_bundle,
        "timeout": timeout or cfg.timeout,
        "retries": retries,
    }
    if kind == "caikit" and grpc_target:
        return CaikitGrpcClient(grpc_target, **settings)
    if not url:
        raise _error(ValueError, "no_url")
    return (VllmClient if kind == "vllm" else CaikitHttpClient)(url, **settings)
