"""The real caikit runtime on 127.0.0.1 (detox_sft_dev.model_server) queried by the real clients (detox_sft.clients).

One server per module (startup takes seconds). The end-to-end test at the bottom runs the whole serving path:
export the offline model from an adapter, upload it to SeaweedFS, ``detox-sft-dev serve --from-s3``, query HTTP and gRPC.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from detox_sft.clients import (
    BadRequest,
    CaikitGrpcClient,
    CaikitHttpClient,
    ModelNotFound,
    ModelServerError,
    ServerUnavailable,
    StreamingNotSupported,
)
from detox_sft.export import CHECK_PROMPT
from detox_sft_dev.model_server import LocalModelServer, PortInUseError, ServingError
from detox_sft_dev.s3 import free_port, port_in_use

pytestmark = pytest.mark.service

MODEL_ID = "tiny-opt"
MAX_POSITIONS = 64


def build_tiny_opt(out: Path) -> Path:
    """A tiny random OPT (opt-350m's quirks: projections, post-layer-norm) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, a tiny model"] * 20, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        do_layer_norm_before=False,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    OPTForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models directory holding one Caikit model (a tiny OPT converted with caikit-nlp)."""
    from detox_sft.export import convert_to_caikit

    root = tmp_path_factory.mktemp("serving")
    hf = build_tiny_opt(root / "hf")
    convert_to_caikit(hf, root / "models" / MODEL_ID)
    return root / "models"


@pytest.fixture(scope="module")
def runtime(models_dir):
    with LocalModelServer(models_dir) as srv:
        yield srv


@pytest.fixture
def server(runtime):
    """The module's runtime, started again should a test have killed it (same ports)."""
    if runtime.process is None:
        runtime.start()
    return runtime


@pytest.fixture
def http(server):
    with CaikitHttpClient(server.http_url, timeout=60) as client:
        yield client


@pytest.fixture
def grpc_client(server):
    with CaikitGrpcClient(server.grpc_target, plaintext=True, timeout=60) as client:
        yield client


LONG_INPUT = "the quick brown fox jumps over the lazy dog " * 20  # well over MAX_POSITIONS tokens


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def _listen_addresses(port: int) -> list[str]:
    """Hex local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.append(addr)
    return found


def test_server_listens_on_localhost_only(server):
    for port in (server.http_port, server.grpc_port):
        addresses = _listen_addresses(port)
        assert addresses and set(addresses) <= LOOPBACK, (port, addresses)  # not 0.0.0.0 / [::] as caikit would
    assert server.model_ids == [MODEL_ID]


def test_http_and_grpc_generate_the_same_text(http, grpc_client):
    a = http.generate(MODEL_ID, "the quick brown", max_new_tokens=6)
    b = grpc_client.generate(MODEL_ID, "the quick brown", max_new_tokens=6)
    assert isinstance(a.text, str) and a.text.strip()
    assert a.text == b.text  # greedy: both protocols reach the same model
    assert a.finish_reason == b.finish_reason == "MAX_TOKENS"
    assert not a.text.startswith("the quick brown")  # the prompt is not echoed back
    assert a.input_token_count == b.input_token_count > 0


def test_sampling_with_seed_is_reproducible(http):
    kw = {"max_new_tokens": 8, "decoding": "sampling", "top_p": 0.9, "temperature": 1.0, "seed": 7}
    assert http.generate_text(MODEL_ID, "hello world", **kw) == http.generate_text(MODEL_ID, "hello world", **kw)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_unknown_model_id(kind, http, grpc_client):
    client = http if kind == "http" else grpc_client
    with pytest.raises(ModelNotFound, match="no-such-model"):
        client.generate("no-such-model", "hello")


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_empty_input_is_a_bad_request(kind, http, grpc_client):
    client = http if kind == "http" else grpc_client
    with pytest.raises(BadRequest) as info:
        client.generate(MODEL_ID, "")
    if kind == "http":  # the server's own explanation comes through
        assert info.value.status == 400 and "text" in info.value.detail


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_input_longer_than_context_needs_truncation(kind, http, grpc_client):
    client = http if kind == "http" else grpc_client
    with pytest.raises(ModelServerError, match="truncate_input_tokens"):
        client.generate(MODEL_ID, LONG_INPUT, max_new_tokens=4)
    result = client.generate(MODEL_ID, LONG_INPUT, max_new_tokens=4, truncate_input_tokens=32)
    assert result.input_token_count == 32
    assert result.text


def test_grpc_token_to_the_local_runtime_goes_over_local_credentials(server, grpc_client):
    """A token to a loopback target rides gRPC's local channel credentials, which the caikit runtime accepts."""
    with CaikitGrpcClient(server.grpc_target, token="local-test-token-123", timeout=60) as client:
        assert client.plaintext  # a bare loopback target: plaintext, to this machine only
        expected = grpc_client.generate_text(MODEL_ID, "hello world", max_new_tokens=4)
        assert client.generate_text(MODEL_ID, "hello world", max_new_tokens=4) == expected


def test_local_module_does_not_stream(http):
    with pytest.raises(StreamingNotSupported):
        list(http.generate_stream(MODEL_ID, "hello world", max_new_tokens=4))
    pieces = list(http.generate_stream(MODEL_ID, "hello world", max_new_tokens=4, fallback=True))
    assert pieces == [http.generate_text(MODEL_ID, "hello world", max_new_tokens=4)]


def test_query_cli_prints_the_text(server, http, capsys):
    from detox_sft.cli import main

    expected = http.generate_text(MODEL_ID, "hello world", max_new_tokens=5)
    assert (
        main(["query", "--url", server.http_url, "--model-id", MODEL_ID, "--max-new-tokens", "5", "hello world"]) == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert (
        main(
            [
                "query",
                "--url",
                server.http_url,
                "--grpc",
                server.grpc_target,
                "--model-id",
                MODEL_ID,
                "--max-new-tokens",
                "5",
                "hello world",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert main(["query", "--url", server.http_url, "--model-id", "nope", "hello"]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_server_down_is_unavailable_after_bounded_retries(kind):
    port = free_port()
    if kind == "http":
        client = CaikitHttpClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.2)
    else:
        client = CaikitGrpcClient(f"127.0.0.1:{port}", plaintext=True, retries=2, backoff=0.2)
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="after 3 attempts"):
        client.generate(MODEL_ID, "hello")
    elapsed = time.monotonic() - start
    # backed off between the three attempts, then gave up: urllib3 retries once at once, then after 2 x 0.2 s;
    # gRPC's retryPolicy waits 0.2 s then 0.4 s, each jittered by +-20 %
    assert {"http": 0.4, "grpc": 0.8 * 0.6}[kind] <= elapsed < 10


def test_port_in_use_is_refused(server, models_dir):
    with pytest.raises(PortInUseError, match=f"HTTP port {server.http_port}"):
        LocalModelServer(models_dir, http_port=server.http_port).start()
    # a runtime that kept only its gRPC port (the crash case): the HTTP port is free, the gRPC one is not
    with pytest.raises(PortInUseError, match=f"gRPC port {server.grpc_port}"):
        LocalModelServer(models_dir, http_port=free_port(), grpc_port=server.grpc_port).start()
    with socket.socket() as sock:  # any other listener
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(PortInUseError):
            LocalModelServer(models_dir, grpc_port=sock.getsockname()[1]).start()


def test_server_killed_mid_request_is_a_typed_error_not_a_hang(server):
    """SIGKILL while requests are in flight: each client raises ServerUnavailable at once, well within its timeout.

    The server is stopped (SIGSTOP) first, so the kernel takes the requests but the runtime cannot answer them before
    the kill: the requests are really in flight, whatever the machine's speed. It kills the module's shared runtime
    (last in this file to use it; the ``server`` fixture restarts it for any test that comes later).
    """
    timeout = 30.0
    results = {}
    try:
        http_client = CaikitHttpClient(server.http_url, timeout=timeout, retries=1, backoff=0.1)
        grpc_c = CaikitGrpcClient(server.grpc_target, timeout=timeout, retries=1, backoff=0.1)
        # warm: the gRPC channel is connected and its message types loaded, HTTP holds a keep-alive connection
        warm = http_client.generate_text(MODEL_ID, "hello", max_new_tokens=2)
        assert grpc_c.generate_text(MODEL_ID, "hello", max_new_tokens=2) == warm

        def ask(name, client):
            start = time.monotonic()
            try:
                results[name] = client.generate(MODEL_ID, "hello world", max_new_tokens=4)
            except Exception as exc:  # the test checks its type below
                results[name] = exc
            results[name + "_seconds"] = time.monotonic() - start

        os.killpg(server.process.pid, signal.SIGSTOP)
        threads = [threading.Thread(target=ask, args=item) for item in (("http", http_client), ("grpc", grpc_c))]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # both requests sent, neither answered
        assert not results
        os.killpg(server.process.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout)
    finally:
        server.stop()  # reaps it (or stops it, should an assertion above fail)
    for name, status in (("http", "disconnected"), ("grpc", "UNAVAILABLE")):
        exc = results[name]
        assert isinstance(exc, ServerUnavailable), (name, exc)
        assert exc.status == status, (name, exc)  # the lost connection, not a timeout
        assert results[name + "_seconds"] < 1.0 + 5.0 < timeout, (name, results)


def test_empty_models_dir_says_what_to_do(tmp_path):
    with pytest.raises(ServingError, match="detox-sft export"):
        LocalModelServer(tmp_path).start()


def test_model_that_fails_to_load_is_reported_quickly(tmp_path):
    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.yml").write_text("module_id: not-a-caikit-module\n")
    start = time.monotonic()
    with pytest.raises(ServingError, match=r"did not load \['broken'\](.|\n)*not-a-caikit-module") as info:
        LocalModelServer(tmp_path / "models", startup_timeout=300).start()
    assert time.monotonic() - start < 120  # reported once the runtime answers, not after the startup timeout
    log = Path(str(info.value).split("From its log (")[1].split(")")[0])
    assert log.is_file()  # the log of a failed start is kept for the user
    log.unlink()


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not printed; output:\n{''.join(seen)}")


def test_end_to_end_export_upload_serve_from_s3_query(zoo, s3_server, offline_recipe, make_adapter, tmp_path):
    """Export the offline model from an adapter, upload it, `serve --from-s3`, and query over HTTP and gRPC."""
    from detox_sft.export import export_model
    from detox_sft.storage import upload_dir

    recipe = offline_recipe
    make_adapter(recipe, zoo.opt)
    exported = export_model(recipe)
    prefix = f"e2e-{os.getpid()}/{recipe.storage.prefix}/caikit"
    upload_dir(exported.caikit_dir, prefix, settings=s3_server.settings(), progress=False)

    http_port, grpc_port = free_port(), free_port()
    models_dir = tmp_path / "models"
    env = {**os.environ, **s3_server.env()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detox_sft_dev.cli",
            "serve",
            "--models-dir",
            str(models_dir),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--from-s3",
            prefix,
            "--recipe",
            "offline",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_for_line(proc, "Ctrl-C to stop", timeout=240)
        model_id = recipe.export.model_id
        assert (models_dir / model_id / "config.yml").is_file()  # downloaded as KServe's storage initializer does
        http = CaikitHttpClient(f"http://127.0.0.1:{http_port}")
        grpc_client = CaikitGrpcClient(f"127.0.0.1:{grpc_port}", plaintext=True)
        prompt = CHECK_PROMPT  # what the export checked
        text = http.generate_text(model_id, prompt, max_new_tokens=8)
        assert text.strip()
        assert grpc_client.generate_text(model_id, prompt, max_new_tokens=8) == text
        assert text == exported.sample  # the served model is the exported one (same greedy continuation)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # a failed assertion: stop the server cleanly (SIGTERM), then for sure
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not port_in_use("127.0.0.1", http_port) and not port_in_use("127.0.0.1", grpc_port)
