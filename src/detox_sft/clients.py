"""Clients for the served model: caikit HTTP, caikit gRPC, and vLLM's OpenAI-compatible API (the ``openai`` client).

Usage::

    client = connect(recipe, url="https://opt-350m-detox.apps.example.com")  # token from $MODEL_TOKEN
    client.generate_text("opt-350m-detox", generation_prompt("you are"), max_new_tokens=20)

A token travels only over TLS, or in plaintext to this machine (the local runtime): :func:`check_token` is that rule,
which a hand-written request calls too (notebooks/4-inference_request.ipynb). It is read from a variable or a file
(:func:`read_token`), never from the command line, and never printed. Retries are the libraries' own (urllib3's
``Retry``, gRPC's ``retryPolicy``, openai's ``max_retries``). Failures raise :class:`ModelServerError` or one of its
kinds (:class:`ModelNotFound`, :class:`BadRequest`, :class:`Unauthorized`, :class:`ServerUnavailable`,
:class:`StreamingNotSupported`), with the server's own message.
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
GRPC_REQUEST = "caikit.runtime.Nlp.TextGenerationTaskRequest"
GRPC_RESULT = "caikit_data_model.nlp.GeneratedTextResult"
GRPC_REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
# a bearer token as RFC 6750 writes it (b64token): anything else would end up echoed in a library's header error
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# gRPC's codes as the HTTP statuses the caikit runtime answers for the same failures
_GRPC_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
_GRPC_STATUS["UNAVAILABLE"] = 503
_TOKEN_FIX = (
    "the variable serving.token_env (MODEL_TOKEN) or the file serving.token_file (`--token-env`, `--token-file`)"
)


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


@dataclass
class GenerationParams:
    """Generation parameters shared by the caikit and vLLM clients (caikit's names; see :meth:`openai` for vLLM's).

    ``truncate_input_tokens`` keeps only the last this many input tokens: caikit fails on an input longer than the
    model's context without it.
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
        """Keyword arguments of ``openai.OpenAI().completions.create``; vLLM's own fields go in ``extra_body``."""
        sampling = self.decoding == "sampling"
        values: dict[str, Any] = {"max_tokens": self.max_new_tokens}
        if sampling:
            values.update(
                {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p)) if v is not None}
            )
        else:
            values["temperature"] = 0.0
        if self.seed is not None:
            values["seed"] = self.seed
        extra = {
            "top_k": self.top_k if sampling else None,
            "min_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "truncate_prompt_tokens": self.truncate_input_tokens,
        }
        extra = {k: v for k, v in extra.items() if v is not None}
        return {**values, "extra_body": extra} if extra else values


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


def _parse_url(url: str):
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"url: got {url!r}. Fix: give the server's base URL, e.g. https://host or http://127.0.0.1:8080."
        )
    return parsed


def check_token(token: str | None, url: str) -> str | None:
    """The rule every client applies before it connects: a token goes over TLS (https) or to this machine only.

    Call it before sending a bearer token by hand (``requests.post(url, headers={"Authorization": ...})``).

    Returns:
        ``token``, or `None` when it is `None` or empty (send no header then).

    Raises:
        InsecureTokenError: ``url`` is plain ``http://`` to a host other than this machine.
        ValueError: ``url`` is not an http(s) URL, or the token holds characters a bearer token cannot have.
    """
    parsed = _parse_url(url)
    return _check_token(token, parsed.scheme == "https", parsed.hostname or "", url.rstrip("/"))


def read_token(serving: ServingConfig | None = None) -> str | None:
    """The bearer token named by ``serving``: the file ``token_file`` when set, else the variable ``token_env``.

    Surrounding whitespace is dropped; `None` when the variable is unset or empty. Never from a command line (``ps``
    and shell history show it).

    Raises:
        ValueError: ``token_file`` is set but cannot be read, or is empty.
    """
    cfg = serving if serving is not None else ServingConfig()
    if not cfg.token_file:
        return os.environ.get(cfg.token_env, "").strip() or None if cfg.token_env else None
    path = Path(cfg.token_file).expanduser()
    fix = f"Fix: write the token into it (`oc create token <service-account> > {path}`)"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(
            f"serving.token_file: cannot read {path} ({reason}). {fix}, or unset token_file to use ${cfg.token_env}."
        ) from None
    if not token:
        raise ValueError(f"serving.token_file: {path} is empty. {fix}.")
    return token


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


def _result(text: str, data: dict, counts: dict, generated: str, inputs: str, reason: Any) -> GenerationResult:
    reason = reason if isinstance(reason, str) else None
    return GenerationResult(text, _count(counts, generated), reason, _count(counts, inputs), data)


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
    text = data.get("generated_text", "")
    return _result(text, data, data, "generated_tokens", "input_token_count", data.get("finish_reason"))


def parse_completion(body: Any) -> GenerationResult:
    """An OpenAI-compatible completion (bytes, str, or decoded: ``Completion.model_dump()``) as a result.

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
    return _result(text, data, usage, "completion_tokens", "prompt_tokens", choice.get("finish_reason"))


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
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
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


def _status_error(status: int, detail: str, where: str, attempts: int) -> ModelServerError:
    """The typed error for an HTTP error answer (caikit or vLLM); ``detail`` is already redacted."""
    if status in (401, 403):
        return Unauthorized(
            f"{where}: {status} {detail or 'unauthorized'}. Fix: give a valid token in {_TOKEN_FIX}: "
            "`oc create token <service-account>`, or the token in the model's details.",
            status,
            detail,
        )
    if status == 404 and detail == "Not Found":  # FastAPI's own 404: the path is wrong, not the model id
        return ModelServerError(
            f"{where}: no such endpoint. Fix: check --url (the base URL) and --kind.", status, detail
        )
    if status == 404:
        return ModelNotFound(
            f"{detail or 'model not found'} ({where}). Fix: use the served model id (the caikit folder name, the "
            "InferenceService name; GET /info/models lists them).",
            status,
            detail,
        )
    if status in (400, 422):
        return BadRequest(f"bad request: {detail}", status, detail)
    if status in (502, 503, 504):
        return ServerUnavailable(
            f"{where} unavailable after {attempts} attempts: {detail or status}. Fix: the server is (re)starting or "
            "overloaded: check `oc get inferenceservice` (or `detox-sft-dev serve`), retry later.",
            status,
            detail,
        )
    hint = ""
    if "index out of range" in detail or "maximum context length" in detail:
        hint = " The input is probably longer than the model's context: set truncate_input_tokens."
    return ModelServerError(f"{where}: server error {status}: {detail}.{hint}", status, detail)


def _unreachable(where: str, attempts: int, reason: str) -> ServerUnavailable:
    return ServerUnavailable(
        f"cannot connect to {where} after {attempts} attempts ({_snippet(reason, 200)}). Fix: check that the server "
        "runs (`detox-sft-dev serve`, or `oc get inferenceservice`) and that the URL is right.",
        status=503,
    )


def _timeout(where: str, seconds: float) -> ServerUnavailable:
    return ServerUnavailable(
        f"{where} did not answer within {seconds:g} s. Fix: check the server, or raise the timeout.", status="timeout"
    )


class _Client:
    """What every client shares: ``generate_text``, ``close``, a context manager, a repr that hides the token."""

    _token: str | None
    url: str
    timeout: float

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
    """The caikit runtime's HTTP API (``POST /api/v1/task/text-generation``), over a ``requests`` session.

    Args:
        url: base URL (``https://<inference service route>`` or ``http://127.0.0.1:<port>``).
        token: bearer token; `None` sends none. Sent only over TLS, or in plaintext to this machine
            (else :class:`InsecureTokenError`).
        verify, ca_bundle: verify the server's TLS certificate, against this CA bundle when given.
        timeout: seconds per request.
        retries, backoff: urllib3's ``Retry`` on refused connections and 502-504; a connection dropped after the
            request went out, a 500 or a 4xx is not resent.
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
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util import Retry

        self._token = check_token(token, url)
        parsed = urlparse(url)
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, max(0, int(retries))
        retry = Retry(
            total=self.retries,
            connect=self.retries,  # refused / unreachable: the request never left, resending is safe
            read=False,  # dropped after the request went out: not resent (the server may have run it, or died of it)
            status=self.retries,
            other=0,
            # text generation changes nothing on the server: a POST answered 502-504 (restarting) is safe to resend
            allowed_methods=frozenset({"GET", "POST"}),
            status_forcelist=(502, 503, 504),
            backoff_factor=backoff,
            retry_after_max=max(1, int(timeout)),
            raise_on_status=False,  # the last 5xx comes back, to be raised with the server's own detail
        )
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.session.headers["Accept"] = "application/json"
        if self._token:
            self.session.headers["Authorization"] = f"Bearer {self._token}"
        # straight to this machine: a proxy from HTTP_PROXY would carry the plaintext request (token) off it
        self.session.trust_env = not (parsed.scheme == "http" and is_loopback(parsed.hostname or ""))
        self.session.verify = str(ca_bundle) if (ca_bundle and verify) else bool(verify)
        if not verify:
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
            raise ModelServerError(
                f"TLS verification failed for {self.url}: {exc}. Fix: pass the cluster's CA bundle "
                "(--ca-bundle / ca_bundle=), or --insecure for a throwaway test cluster only."
            ) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise _timeout(url, self.timeout) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            inner = exc.args[0] if exc.args else exc
            if isinstance(inner, urllib3.exceptions.MaxRetryError):
                raise _unreachable(self.url, self.retries + 1, str(inner.reason or inner)) from exc
            raise self._dropped(url, exc) from exc
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise ModelServerError(f"{url}: the request failed ({type(exc).__name__}: {_snippet(str(exc))}).") from exc
        if resp.status_code >= 400:
            retry = getattr(resp.raw, "retries", None)
            attempts = len(retry.history) + 1 if retry is not None else 1
            detail = _redact(error_detail(resp.content), self._token)
            raise _status_error(resp.status_code, detail, resp.url, attempts)
        return resp

    @staticmethod
    def _dropped(url: str, exc: BaseException) -> ServerUnavailable:
        return ServerUnavailable(
            f"{url}: the connection closed before the server answered ({_snippet(str(exc), 200)}); the request was "
            "not resent, as the server may have run it (or died of it). Fix: check the server's state and log "
            "(`oc get pods`, or the output of `detox-sft-dev serve`), then retry.",
            status="disconnected",
        )

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
                            raise StreamingNotSupported(
                                f"the server could not stream {model_id!r} ({detail}): caikit-nlp's local module "
                                "does not stream (the TGIS-backed runtime does). Fix: use generate(), or fallback=True.",
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
                    raise _timeout(f"the stream from {self.url}", self.timeout) from exc
                raise self._dropped(f"{self.url}{CAIKIT_STREAMING}", exc) from exc


class VllmClient(_Client):
    """vLLM's OpenAI-compatible API (``POST /v1/completions``) through the ``openai`` client.

    The ``openai`` client resends connection failures, timeouts, 408/409/429 and 5xx answers up to ``retries``
    times with its own backoff (honouring ``Retry-After``).

    ``url`` is the server's base URL, with or without ``/v1``; a missing token sends no Authorization header (never
    ``$OPENAI_API_KEY``); the other arguments are as for :class:`CaikitHttpClient`.
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
    ) -> None:
        import httpx2
        import openai

        self._token = check_token(token, url)
        parsed = urlparse(url)
        self.url, self.timeout = url.rstrip("/").removesuffix("/v1"), timeout
        http = httpx2.Client(
            verify=str(ca_bundle) if (ca_bundle and verify) else bool(verify),
            trust_env=not (parsed.scheme == "http" and is_loopback(parsed.hostname or "")),  # as CaikitHttpClient
        )
        # api_key is passed explicitly: left None, openai would read $OPENAI_API_KEY and send it to this URL
        self.openai = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self._token or "-", max_retries=max(0, int(retries)),
            timeout=timeout, http_client=http,
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
        else:
            return parse_completion(completion.model_dump())
        raise error


class CaikitGrpcClient(_Client):
    """The caikit runtime's gRPC API (``caikit.runtime.Nlp.NlpService/TextGenerationTaskPredict``, ``mm-model-id``).

    Message types come from the server by gRPC reflection; unlike caikit-nlp-client 0.0.8 this client sends the
    bearer token (gRPC call credentials on every call, reflection included) and maps errors.

    Args:
        target: ``host:port`` (plaintext to a loopback host, else TLS), ``grpc://host:port`` (plaintext) or
            ``grpcs://host:port`` (TLS, verified against ``ca_bundle`` or the system roots).
        plaintext: overrides what the target says.
        verify: with ``False`` the server's own certificate is fetched and trusted (throwaway clusters only).
        retries, backoff: gRPC's ``retryPolicy`` on UNAVAILABLE (at most 5 attempts in all; initial backoff in s).
        token, ca_bundle, timeout: as for :class:`CaikitHttpClient`.
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
            plaintext = scheme in ("grpc", "http") if plaintext is None else plaintext
        host, _, port = (rest if sep else target).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"grpc target: got {target!r}. {fix}")
        self.url = f"{host}:{port}"
        self.plaintext = is_loopback(host) if plaintext is None else bool(plaintext)
        self._token = _check_token(token, not self.plaintext, host, self.url)
        self.timeout, self.retries = timeout, max(0, int(retries))
        options = self._options(backoff)
        if self.plaintext and self._token:
            # to this machine only (checked above): local credentials let gRPC attach call credentials without TLS,
            # and gRPC itself refuses them for a peer that is not on this machine
            creds = grpc.composite_channel_credentials(
                grpc.local_channel_credentials(), grpc.access_token_call_credentials(self._token)
            )
            self.channel = grpc.secure_channel(self.url, creds, options)
        elif self.plaintext:
            self.channel = grpc.insecure_channel(self.url, options)
        else:
            root = None
            if ca_bundle and verify:
                root = Path(ca_bundle).read_bytes()
            elif not verify:
                import ssl

                root = ssl.get_server_certificate((host.strip("[]"), int(port))).encode()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            if self._token:
                creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self._token))
            self.channel = grpc.secure_channel(self.url, creds, options)
        self._stubs: tuple[Any, Any] | None = None

    def _options(self, backoff: float) -> list[tuple[str, Any]]:
        """Channel options: a default deadline and gRPC's own retries (``retryPolicy``) for caikit and reflection."""
        method: dict[str, Any] = {
            "name": [{"service": GRPC_SERVICE}, {"service": GRPC_REFLECTION}],
            "timeout": f"{self.timeout:.3f}s",  # reflection calls (inside protobuf's descriptor pool) get one too
        }
        if self.retries:
            method["retryPolicy"] = {
                "maxAttempts": min(self.retries + 1, 5),  # gRPC caps attempts at 5
                "initialBackoff": f"{max(backoff, 0.001):.3f}s",  # gRPC jitters each backoff by +-20 %
                "maxBackoff": "30s",
                "backoffMultiplier": 2,
                # refused, reset, server (re)starting; not INTERNAL, the failure of this very input
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return [
            ("grpc.enable_retries", int(self.retries > 0)),
            ("grpc.service_config", json.dumps({"methodConfig": [method]})),
            # reconnect as soon as a retry is due (by default a refused connection is next tried after 1 s)
            ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff * 1000))),
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
                req = GetMessageClass(pool.FindMessageTypeByName(GRPC_REQUEST))
                res = GetMessageClass(pool.FindMessageTypeByName(GRPC_RESULT))
            except KeyError as exc:
                raise ModelServerError(
                    f"{self.url} does not serve caikit's text generation ({exc}). Fix: check the gRPC target."
                ) from exc
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
        """Generate a continuation of ``text`` (keywords override ``params``; see :class:`GenerationParams`).

        An empty ``text`` is refused here: the gRPC API cannot tell it from an unset field and would generate from
        nothing, while the HTTP API answers 400.
        """
        from google.protobuf.json_format import MessageToDict

        _check_input(text)
        p = _params(params, overrides)
        request_type, predict = self._call(self._load_stubs)
        fields = {f.name for f in request_type.DESCRIPTOR.fields}
        request = request_type(text=text, **{k: v for k, v in p.caikit().items() if k in fields})
        response = self._call(lambda: predict(request, metadata=[("mm-model-id", model_id)], timeout=self.timeout))
        raw = MessageToDict(response, preserving_proto_field_name=True)
        counts = {"generated_tokens": response.generated_tokens, "input_token_count": response.input_token_count}
        return _result(
            response.generated_text, raw, counts, "generated_tokens", "input_token_count", raw.get("finish_reason")
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

    ``grpc_target`` given (and ``kind`` caikit): a :class:`CaikitGrpcClient`, whose TLS follows the target, not the
    HTTP URL; else a :class:`CaikitHttpClient` or (``kind="vllm"``) a :class:`VllmClient` for ``url``.

    Raises:
        InsecureTokenError: the token would travel in plaintext to a host other than this machine.
        ValueError: no URL, or an unknown ``kind``.
    """
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
        "retries": retries,
    }
    if kind == "caikit" and grpc_target:
        return CaikitGrpcClient(grpc_target, **settings)
    if not url:
        raise ValueError(
            "no server URL. Fix: pass --url (or set serving.url in the recipe); on OpenShift AI: "
            "`oc get inferenceservice <name> -o jsonpath='{.status.url}'`."
        )
    return (VllmClient if kind == "vllm" else CaikitHttpClient)(url, **settings)
