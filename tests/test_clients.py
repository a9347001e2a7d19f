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

from detox_sft.clients import (
    BadRequest,
    CaikitGrpcClient,
    CaikitHttpClient,
    GenerationParams,
    ModelNotFound,
    ServerUnavailable,
    Unauthorized,
    VllmClient,
    connect,
)


class _Scripted:
    """An HTTP server answering each POST with the next scripted (status, body); records paths, headers, bodies."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
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


def test_vllm_unknown_model(scripted):
    server = scripted(
        (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}})
    )
    with pytest.raises(ModelNotFound, match="does not exist"):
        VllmClient(server.url).generate("x", "hi")


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
