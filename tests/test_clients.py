"""Client behaviour that the local caikit runtime cannot show: bearer tokens, 503 retries, 401, TLS settings, vLLM.

The caikit runtime has no token auth and never answers 503, and there is no vLLM on this machine, so these tests run
the clients against a small scripted HTTP server on 127.0.0.1 that records what it receives (the real-server
behaviour is in tests/test_serving.py), and a real gRPC server that checks the authorization metadata.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from requests.structures import CaseInsensitiveDict

from detox_sft.clients import (
    BadRequest,
    CaikitGrpcClient,
    CaikitHttpClient,
    GenerationParams,
    InsecureTokenError,
    ModelNotFound,
    ModelServerError,
    ServerUnavailable,
    Unauthorized,
    VllmClient,
    check_token,
    connect,
    is_loopback,
    read_token,
)
from detox_sft.config import ServingConfig


class _Scripted:
    """An HTTP server answering each POST with the next scripted (status, body); records paths, headers, bodies."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = CaseInsensitiveDict(self.headers)  # httpx (openai) sends lower-case names
                outer.requests.append({"path": self.path, "headers": headers, "body": body})
                status, payload = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*script):
        servers.append(_Scripted(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


CAIKIT_OK = (
    200,
    {"generated_text": " a sunny day", "generated_tokens": 4, "finish_reason": "MAX_TOKENS", "input_token_count": 6},
)


def test_caikit_http_sends_token_and_parameters(scripted):
    server = scripted(CAIKIT_OK)
    client = CaikitHttpClient(server.url, token="s3cret")
    result = client.generate(
        "opt-350m-detox",
        "The weather is",
        max_new_tokens=7,
        decoding="sampling",
        top_p=0.9,
        temperature=0.8,
        seed=1,
        truncate_input_tokens=32,
    )
    assert result.text == " a sunny day" and result.generated_tokens == 4
    request = server.requests[0]
    assert request["path"] == "/api/v1/task/text-generation"
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    assert request["body"] == {
        "model_id": "opt-350m-detox",
        "inputs": "The weather is",
        "parameters": {
            "max_new_tokens": 7,
            "decoding_method": "SAMPLING",
            "top_p": 0.9,
            "temperature": 0.8,
            "seed": 1,
            "truncate_input_tokens": 32,
            "preserve_input_text": False,
        },
    }


def test_retries_503_then_succeeds(scripted):
    server = scripted((503, {"details": "starting"}), (503, {"details": "starting"}), CAIKIT_OK)
    assert CaikitHttpClient(server.url, retries=3, backoff=0.01).generate_text("m", "x") == " a sunny day"
    assert len(server.requests) == 3


def test_503_retries_are_bounded(scripted):
    server = scripted((503, {"details": "overloaded"}))
    with pytest.raises(ServerUnavailable, match="after 3 attempts"):
        CaikitHttpClient(server.url, retries=2, backoff=0.01).generate("m", "x")
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [401, 403])
def test_unauthorized_is_not_retried(scripted, status):
    server = scripted((status, {"details": "token rejected"}))
    with pytest.raises(Unauthorized, match="token rejected"):
        CaikitHttpClient(server.url, token="wrong").generate("m", "x")
    assert len(server.requests) == 1


def test_errors_keep_the_server_detail(scripted):
    server = scripted((400, {"details": "max_new_tokens must be positive", "code": 400}))
    with pytest.raises(BadRequest) as info:
        CaikitHttpClient(server.url).generate("m", "x")
    assert info.value.detail == "max_new_tokens must be positive" and info.value.status == 400


def test_vllm_completions(scripted):
    server = scripted(
        (
            200,
            {
                "choices": [{"text": " indeed", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            },
        )
    )
    client = VllmClient(server.url + "/v1", token="t")  # base URL with or without /v1
    result = client.generate("opt-350m-detox", "It is", max_new_tokens=2, truncate_input_tokens=16)
    assert (result.text, result.generated_tokens, result.finish_reason) == (" indeed", 2, "length")
    request = server.requests[0]
    assert request["path"] == "/v1/completions" and request["headers"]["Authorization"] == "Bearer t"
    assert request["body"] == {
        "model": "opt-350m-detox",
        "prompt": "It is",
        "max_tokens": 2,
        "temperature": 0.0,
        "truncate_prompt_tokens": 16,
    }


def test_vllm_without_a_token_sends_no_authorization_not_even_openai_api_key(scripted, monkeypatch):
    """openai would read $OPENAI_API_KEY when given no key: the client never lets it, and sends no header."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = scripted((200, {"choices": [{"text": " ok", "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}))
    with VllmClient(server.url) as client:
        assert client.generate_text("m", "hi", decoding="sampling", top_p=0.9, top_k=5, seed=2) == " ok"
    request = server.requests[0]
    assert "authorization" not in request["headers"] and SECRET not in json.dumps(dict(request["headers"]))
    assert request["body"] == {"model": "m", "prompt": "hi", "max_tokens": 20, "top_p": 0.9, "seed": 2, "top_k": 5}


def test_vllm_503_is_retried_by_openai_boundedly(scripted):
    server = scripted((503, {"error": {"message": "loading", "code": 503}}))
    with pytest.raises(ServerUnavailable, match="after 2 attempts: loading"):
        VllmClient(server.url, retries=1).generate("m", "x")
    assert len(server.requests) == 2


def test_vllm_unknown_model(scripted):
    server = scripted(
        (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}})
    )
    with pytest.raises(ModelNotFound, match="does not exist"):
        VllmClient(server.url).generate("x", "hi")


@pytest.mark.parametrize("body", [{"choices": []}, {"choices": [{"text": 3}]}, {"usage": {}}])
def test_vllm_malformed_completion_is_a_model_server_error(scripted, body):
    """openai builds its answer models without validating them: a malformed answer is still a typed error."""
    server = scripted((200, body))
    with pytest.raises(ModelServerError, match="unexpected .* response"):
        VllmClient(server.url, retries=0).generate("m", "hi")


def test_tls_is_verified_by_default(tmp_path):
    assert CaikitHttpClient("https://model.example.com").session.verify is True
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert CaikitHttpClient("https://model.example.com", ca_bundle=bundle).session.verify == str(bundle)
    assert CaikitHttpClient("https://model.example.com", verify=False).session.verify is False


def test_generation_params_are_checked():
    with pytest.raises(ValueError, match="decoding"):
        GenerationParams(decoding="beam")
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationParams(max_new_tokens=0)
    assert GenerationParams().caikit() == {
        "max_new_tokens": 20,
        "decoding_method": "GREEDY",
        "preserve_input_text": False,
    }


def test_connect_reads_token_and_settings_from_recipe(offline_recipe, monkeypatch):
    monkeypatch.setenv(offline_recipe.serving.token_env, "from-env")
    client = connect(offline_recipe, url="https://model.example.com")
    assert isinstance(client, CaikitHttpClient)
    assert client.session.headers["Authorization"] == "Bearer from-env"
    assert client.timeout == offline_recipe.serving.timeout
    assert isinstance(connect(offline_recipe, url="https://m.example.com", kind="vllm"), VllmClient)
    grpc_client = connect(offline_recipe, url="http://127.0.0.1:8080", grpc_target="127.0.0.1:8085")
    assert isinstance(grpc_client, CaikitGrpcClient)
    with pytest.raises(ValueError, match="--url"):
        connect(offline_recipe)


def test_grpc_client_sends_bearer_token():
    """A real gRPC server that requires the token: the reflection call already carries it."""
    import grpc
    from grpc_reflection.v1alpha import reflection

    seen = []

    class RequireToken(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            metadata = dict(details.invocation_metadata)
            seen.append(metadata.get("authorization"))
            if metadata.get("authorization") != "Bearer good":

                def deny(request, context):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

                def deny_stream(request_iterator, context):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

                handler = continuation(details)
                if handler is not None and handler.request_streaming:
                    return grpc.stream_stream_rpc_method_handler(deny_stream)
                return grpc.unary_unary_rpc_method_handler(deny)
            return continuation(details)

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[RequireToken()])
    reflection.enable_server_reflection([reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(Unauthorized, match="bad token"):
            CaikitGrpcClient(f"127.0.0.1:{port}", plaintext=True, token="bad").generate("m", "hi")
        assert "Bearer bad" in seen
        # the right token passes authorization; this server has no caikit service, which the client says clearly
        with pytest.raises(Exception, match="does not serve caikit"):
            CaikitGrpcClient(f"127.0.0.1:{port}", plaintext=True, token="good").generate("m", "hi")
        assert seen[-1] == "Bearer good"
    finally:
        server.stop(0)


def test_query_cli_token_from_env(scripted, monkeypatch, capsys):
    from detox_sft.cli import main

    server = scripted(CAIKIT_OK)
    monkeypatch.setenv("MODEL_TOKEN", "env-token")
    assert (
        main(
            [
                "query",
                "--url",
                server.url,
                "--model-id",
                "opt-350m-detox",
                "--seed",
                "3",
                "--sampling",
                "The weather is",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out == " a sunny day\n"
    assert "env-token" not in captured.out + captured.err  # the token is sent, never printed
    assert server.requests[0]["headers"]["Authorization"] == "Bearer env-token"
    assert server.requests[0]["body"]["parameters"]["decoding_method"] == "SAMPLING"


# --- tokens: TLS only (or this machine), from the environment or a file, never printed -----------------------------

SECRET = "sha256~Zm9vYmFyYmF6cXV4LXNlY3JldC10b2tlbi0xMjM0NTY3ODk"  # shaped like an OpenShift token


@pytest.fixture
def no_connections(monkeypatch):
    """Fail the test if anything opens a TCP connection (the token checks must come first)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.42.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("::", False),
        ("localhost.example.com", False),
        ("model.apps.example.com", False),
        ("", False),
    ],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "make",
    [
        lambda: CaikitHttpClient("http://model.example.com", token=SECRET),
        lambda: VllmClient("http://10.0.0.5:8000/v1", token=SECRET),
        lambda: CaikitGrpcClient("grpc://model.example.com:8033", token=SECRET),
        lambda: CaikitGrpcClient("http://10.0.0.5:8033", token=SECRET),
        lambda: CaikitGrpcClient("10.0.0.5:8033", plaintext=True, token=SECRET),
    ],
    ids=["caikit-http", "vllm-http", "grpc-scheme", "grpc-http-scheme", "grpc-plaintext"],
)
def test_token_is_refused_over_plaintext_to_another_host(make, no_connections):
    with pytest.raises(InsecureTokenError, match="Fix: use the server's TLS endpoint") as info:
        make()
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "url, allowed",
    [("https://model.example.com", True), ("http://127.0.0.1:8080", True), ("http://model.example.com", False)],
)
def test_check_token_is_the_rule_a_hand_written_request_calls(url, allowed, no_connections):
    """Notebook 4 calls check_token before its own requests.post: the same rule as the clients, before any connection."""
    if allowed:
        assert check_token(SECRET, url) == SECRET
    else:
        with pytest.raises(InsecureTokenError) as info:
            check_token(SECRET, url)
        assert SECRET not in str(info.value)
    assert check_token(None, url) is None and check_token("", url) is None  # no token: anything goes
    with pytest.raises(ValueError, match="characters a token cannot have"):
        check_token("tok\nX-Injected: 1", url)


def test_token_is_allowed_over_tls_and_to_this_machine(no_connections):
    """TLS anywhere, plaintext to a loopback address; constructing a client connects to nothing."""
    for url in ("https://model.example.com", "http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost:8080"):
        assert CaikitHttpClient(url, token=SECRET).session.headers["Authorization"] == f"Bearer {SECRET}"
    assert not CaikitGrpcClient("model.example.com:443", token=SECRET).plaintext  # a bare remote target: TLS
    assert not CaikitGrpcClient("grpcs://10.0.0.5:8033", token=SECRET).plaintext
    assert CaikitGrpcClient("127.0.0.1:8085", token=SECRET).plaintext  # the local runtime: plaintext
    assert CaikitGrpcClient("grpc://localhost:8085", token=SECRET).plaintext
    assert CaikitHttpClient("http://model.example.com").session.headers.get("Authorization") is None  # no token: ok


def test_grpc_tls_is_chosen_by_the_grpc_target_not_the_http_url(monkeypatch, no_connections):
    monkeypatch.setenv("MODEL_TOKEN", SECRET)
    client = connect(url="http://127.0.0.1:8080", grpc_target="model.apps.example.com:443")
    assert isinstance(client, CaikitGrpcClient) and not client.plaintext
    with pytest.raises(InsecureTokenError):
        connect(url="http://model.example.com:8080")


def test_malformed_token_is_refused_without_echoing_it():
    for bad in ("abc def", "tok\nX-Injected: 1", "tökén-with-umlauts"):
        with pytest.raises(ValueError, match="characters a token cannot have") as info:
            CaikitHttpClient("https://model.example.com", token=bad)
        assert bad not in str(info.value)


def test_token_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", f"  {SECRET}\n")
    assert read_token(ServingConfig(token_env="MY_TOKEN")) == SECRET
    monkeypatch.delenv("MY_TOKEN")
    assert read_token(ServingConfig(token_env="MY_TOKEN")) is None
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")  # `oc create token sa > token`
    monkeypatch.setenv("MY_TOKEN", "from-env-ignored")
    assert read_token(ServingConfig(token_env="MY_TOKEN", token_file=str(token_file))) == SECRET  # the file wins
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="token_file: .* is empty"):
        read_token(ServingConfig(token_file=str(token_file)))
    with pytest.raises(ValueError, match="token_file: cannot read"):
        read_token(ServingConfig(token_file=str(tmp_path / "missing")))


def test_query_cli_reads_token_file_and_refuses_token_flag(scripted, tmp_path, capsys):
    from detox_sft.cli import main

    server = scripted(CAIKIT_OK)
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    argv = ["query", "--url", server.url, "--model-id", "m", "--token-file", str(token_file), "hello"]
    assert main(argv) == 0
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    with pytest.raises(SystemExit) as info:
        main(["query", "--url", server.url, "--token", SECRET, "hello"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--token is not accepted" in err and "--token-file" in err and SECRET not in err
    assert len(server.requests) == 1  # refused before any request


def test_query_cli_token_from_named_variable(scripted, monkeypatch, capsys):
    from detox_sft.cli import main

    server = scripted(CAIKIT_OK)
    monkeypatch.setenv("OTHER_TOKEN", SECRET)
    assert main(["query", "--url", server.url, "--model-id", "m", "--token-env", "OTHER_TOKEN", "hello"]) == 0
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in "".join(capsys.readouterr())


def _self_signed(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return key.read_bytes(), cert


def _grpc_server(interceptors, credentials=None):
    import grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=interceptors)
    reflection.enable_server_reflection([reflection.SERVICE_NAME], server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


class _Seen:
    """A gRPC server interceptor recording each call's authorization metadata; ``deny`` answers with a status."""

    def __init__(self, deny=None):
        import grpc

        self.calls = []
        outer = self

        class Interceptor(grpc.ServerInterceptor):
            def intercept_service(self, continuation, details):
                metadata = dict(details.invocation_metadata)
                outer.calls.append(metadata.get("authorization"))
                verdict = deny(len(outer.calls), metadata) if deny else None
                if verdict is None:
                    return continuation(details)
                code, message = verdict

                def abort(request_iterator, context):
                    context.abort(code, message)

                return grpc.stream_stream_rpc_method_handler(abort)  # reflection is a stream-stream call

        self.interceptor = Interceptor()


def test_grpc_tls_sends_token_as_call_credentials(tmp_path):
    """grpcs:// with the CA bundle: the token travels as gRPC's own access-token call credentials."""
    import grpc

    key, cert = _self_signed(tmp_path)
    seen = _Seen()
    server, port = _grpc_server([seen.interceptor], grpc.ssl_server_credentials([(key, cert.read_bytes())]))
    try:
        client = CaikitGrpcClient(f"grpcs://localhost:{port}", token=SECRET, ca_bundle=cert, timeout=10)
        with pytest.raises(ModelServerError, match="does not serve caikit"):
            client.generate("m", "hi")
        assert seen.calls and set(seen.calls) == {f"Bearer {SECRET}"}
    finally:
        server.stop(0)


def test_grpc_retries_unavailable_with_the_retry_policy():
    """The channel's retryPolicy resends a call answered UNAVAILABLE (here the reflection call), boundedly."""
    import grpc

    def flaky(n, metadata):
        return (grpc.StatusCode.UNAVAILABLE, "warming up") if n <= 2 else None

    seen = _Seen(flaky)
    server, port = _grpc_server([seen.interceptor])
    try:
        with pytest.raises(ModelServerError, match="does not serve caikit"):  # reached the server's reflection
            CaikitGrpcClient(f"127.0.0.1:{port}", retries=3, backoff=0.01).generate("m", "hi")
        assert len(seen.calls) >= 3
        seen.calls.clear()
        with pytest.raises(ServerUnavailable, match="after 2 attempts: warming up"):
            CaikitGrpcClient(f"127.0.0.1:{port}", retries=1, backoff=0.01).generate("m", "hi")
        assert len(seen.calls) == 2
    finally:
        server.stop(0)


def test_500_is_not_retried(scripted):
    server = scripted((500, {"details": "index out of range in self", "code": 500}))
    with pytest.raises(ModelServerError, match="truncate_input_tokens"):
        CaikitHttpClient(server.url, retries=3, backoff=0.01).generate("m", "x")
    assert len(server.requests) == 1


def test_connection_dropped_mid_request_is_not_resent():
    """The server reads the request and closes the connection without an answer: one attempt, a typed error."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    received = []

    def serve():
        for _ in range(2):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            received.append(conn.recv(65536))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = CaikitHttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}", retries=3, backoff=0.01, timeout=5)
        with pytest.raises(ServerUnavailable, match="not resent") as info:
            client.generate("m", "x")
        assert info.value.status == "disconnected"
        assert len(received) == 1
    finally:
        listener.close()


def test_no_output_ever_shows_the_token(scripted, monkeypatch, capfd, caplog):
    """Wrong tokens, a server that echoes the Authorization header, unreachable servers: the token never shows."""
    import logging

    import grpc

    caplog.set_level(logging.DEBUG)  # urllib3's and grpc's loggers included
    echo = scripted((401, {"details": "rejected", "echo": "Bearer " + SECRET}))
    echo_detail = scripted((403, {"details": f"token {SECRET} lacks get on inferenceservices"}))
    unavailable = scripted((503, {"details": f"no upstream for Bearer {SECRET}"}))

    def deny(n, metadata):
        return grpc.StatusCode.UNAUTHENTICATED, f"bad token: {metadata.get('authorization')}"

    seen = _Seen(deny)
    grpc_server, grpc_port = _grpc_server([seen.interceptor])
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    clients = [
        CaikitHttpClient(echo.url, token=SECRET),
        CaikitHttpClient(echo_detail.url, token=SECRET),
        VllmClient(unavailable.url, token=SECRET, retries=1),
        CaikitHttpClient(f"http://127.0.0.1:{dead}", token=SECRET, retries=1, backoff=0.01),
        CaikitGrpcClient(f"127.0.0.1:{grpc_port}", token=SECRET, retries=1, backoff=0.01),
        CaikitGrpcClient(f"127.0.0.1:{dead}", token=SECRET, retries=1, backoff=0.01),
    ]
    texts = []
    try:
        for client in clients:
            texts.append(repr(client))
            with pytest.raises(ModelServerError) as info:
                client.generate("m", "x")
            exc = info.value
            while exc is not None:  # the whole chain a traceback would print
                texts += [str(exc), repr(exc), repr(exc.args), str(getattr(exc, "detail", ""))]
                exc = exc.__cause__ or exc.__context__
            texts.append(info.getrepr(style="long").__str__())
        from detox_sft.cli import main

        monkeypatch.setenv("MODEL_TOKEN", SECRET)
        assert main(["query", "--url", echo.url, "--model-id", "m", "hello"]) == 1
        assert main(["query", "--url", echo.url, "--grpc", f"127.0.0.1:{grpc_port}", "--model-id", "m", "hi"]) == 1
    finally:
        grpc_server.stop(0)
    assert seen.calls and set(seen.calls) == {f"Bearer {SECRET}"}  # it was sent, over loopback
    assert echo.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    texts += [str(record.args) for record in caplog.records]
    leaks = [t for t in texts if SECRET in t]
    assert not leaks, leaks[:3]


def test_plaintext_to_this_machine_bypasses_proxies(scripted, monkeypatch):
    """HTTP_PROXY must not route a plaintext request (and its token) to the local server through another host."""
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.com:3128")
    monkeypatch.setenv("NO_PROXY", "")
    server = scripted(CAIKIT_OK)
    assert CaikitHttpClient(server.url, token=SECRET, retries=0).generate_text("m", "x") == " a sunny day"
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
