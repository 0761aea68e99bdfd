"""``fedlora client`` without a SuperLink: rank table, input validation, node config, failure mapping, TLS probe."""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from deploy import free_port
from flwr.common.config import parse_config_args

from client.device import main, supernode_command
from client.device_link import FailureKind, classify_supernode_exit, probe_superlink
from client.device_memory import (
    GIB,
    USABLE_SHARE,
    AutoRank,
    ModelShape,
    auto_rank,
    free_memory,
    meminfo_available,
    training_bytes,
)
from client.device_options import UsageError, node_config_string, parse_options
from client.model import resolve_model
from common.config import RunConfig
from server.certs import CertPaths, create_certs, issue_server_certificate, pem_certificate, pem_private_key, write_file

# Log tails recorded from flower-supernode 1.42 (ANSI colours as it prints them).
REFUSED_LOG = [
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
    "Failed to initialize the connection to the SuperLink.\n",
    "[code: 2004] Failed to activate SuperNode.\n",
    "The SuperNode could not establish a connection to the SuperLink.\n",
    "INFO:     Finished server process [7270]\n",
]
NO_KEY_LOG = [
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
    "Failed to initialize the connection to the SuperLink.\n",
    "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.\n",
]
TLS_LOG = [
    "\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n",
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
    "Failed to initialize the connection to the SuperLink.\n",
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"
    " (_ssl.c:1006)\n",
]
UNREACHABLE_LOG = [
    "\x1b[93mWARNING \x1b[0m:   Giving up reconnection after 5.00 seconds and 4 tries.\n",
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
    "Failed to initialize the connection to the SuperLink.\n",
    "[Errno 111] Connection refused\n",
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return create_certs(tmp_path_factory.mktemp("certs"), nodes=1)[0]


def _args(certs: CertPaths, **overrides: str) -> list[str]:
    values = {
        "--superlink": "127.0.0.1:9092",
        "--root-cert": str(certs.ca_cert),
        "--key": str(certs.nodes[0].private),
        "--data": "tiny",
        "--model": "tiny",
        "--rank": "8",
        **overrides,
    }
    return [item for pair in values.items() for item in pair]


@pytest.fixture(scope="module")
def minilm_shape() -> ModelShape:
    return ModelShape.of(resolve_model("minilm-l6"))


@pytest.mark.parametrize("free_gib", [1, 4, 16])
def test_auto_rank_for_minilm_at_stated_budgets_is_the_run_max_rank(minilm_shape: ModelShape, free_gib: int) -> None:
    # MiniLM (23M parameters, 0.08 GiB) needs 0.39 GiB of activations at batch 16 × 64 and 0.21 MiB per unit of rank:
    # any device that can train it at all affords rank 64, and max-rank caps it.
    rank, why = auto_rank(free_gib * GIB, minilm_shape, batch=16, length=64, max_rank=64)
    assert rank == 64 and why.startswith("rank 64 (the most max-rank 64 allows)") and "0.39 GiB of activations" in why
    assert auto_rank(free_gib * GIB, minilm_shape, batch=16, length=64, max_rank=32)[0] == 32
    assert auto_rank(free_gib * GIB, minilm_shape, batch=16, length=64, max_rank=5)[0] == 4


def test_auto_rank_refuses_a_device_that_cannot_train_the_model_with_one_line(minilm_shape: ModelShape) -> None:
    expected = r"not enough memory to train this model even at rank 2: .*\(needs 0\.59 GiB free\)"
    with pytest.raises(ValueError, match=expected):
        auto_rank(GIB // 4, minilm_shape, batch=16, length=64, max_rank=64)
    with pytest.raises(ValueError, match="free_bytes must be >= 0, got -1"):
        auto_rank(-1, minilm_shape, 16, 64, 64)


def test_auto_rank_shrinks_with_per_sample_gradients_and_longer_sequences(minilm_shape: ModelShape) -> None:
    # A budget where rank 64 just fits without DP-SGD: its per-sample gradients (batch × rank × Σ(in + out)) do not.
    parts = training_bytes(minilm_shape, 64, 16, 64, per_sample=False)
    free = int(sum(parts.values()) / USABLE_SHARE) + 1
    plain = auto_rank(free, minilm_shape, 16, 64, 64)[0]
    private = auto_rank(free, minilm_shape, 16, 64, 64, per_sample=True)[0]
    assert plain == 64 and private < plain
    with pytest.raises(ValueError, match="not enough memory"):
        auto_rank(free, minilm_shape, 16, 512, 64)


@pytest.mark.parametrize("model", ["tiny", "minilm-l6"])
def test_the_shape_is_the_real_models(model: str) -> None:
    from client.model import DEFAULT_TARGETS, LoRASettings, attach_lora, load_classifier

    shape = ModelShape.of(resolve_model(model))
    base, _ = load_classifier(resolve_model(model), num_labels=4, seed=0)
    encoder = sum(p.numel() for name, p in base.named_parameters() if not name.startswith("classifier"))
    assert shape.parameters in range(encoder - base.config.hidden_size**2 - base.config.hidden_size, encoder + 1)
    targets = DEFAULT_TARGETS[base.config.model_type]
    settings = LoRASettings(rank=8, lora_alpha=16.0, use_rslora=False, target_modules=targets, max_rank=64, seed=0)
    peft_model = attach_lora(base, settings)
    lora = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    assert lora == 8 * shape.lora_width


def test_auto_rank_never_decreases_with_more_memory(minilm_shape: ModelShape) -> None:
    ranks = [auto_rank(n * GIB // 8, minilm_shape, 16, 64, 64)[0] for n in range(5, 100)]
    assert ranks == sorted(ranks)


def test_each_run_chooses_the_auto_rank_again_within_its_max_rank(minilm_shape: ModelShape) -> None:
    from client.node_settings import NodeSettings

    measured = AutoRank(16 * GIB, minilm_shape).to_json()
    node_config = {"lora-rank": 64, "auto-rank": measured, "node-name": "box"}
    assert " " not in measured and "'" not in measured  # it travels in flower-supernode's --node-config
    small = RunConfig.from_mapping({"max-rank": 8, "node-ranks": "8"})
    assert NodeSettings.from_node_config(small, node_config).rank == 8
    assert NodeSettings.from_node_config(RunConfig(), node_config).rank == 64
    # ... and it survives Flower's own parsing of that flag.
    parsed = parse_config_args([node_config_string(node_config)])
    assert parsed["auto-rank"] == measured and AutoRank.from_json(str(parsed["auto-rank"])).shape == minilm_shape
    broken = {**node_config, "auto-rank": '{"free-bytes":1}'}
    with pytest.raises(ValueError, match="node-config auto-rank"):
        NodeSettings.from_node_config(RunConfig(), broken)


def test_meminfo_available_reads_kib() -> None:
    assert meminfo_available("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 50 kB\n") == 50 * 1024
    assert meminfo_available("MemFree: 10 kB\n") == 10 * 1024


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"--rank": "0"}, "--rank must be 'auto' or an integer in 1..1024, got '0'"),
        ({"--rank": "big"}, "--rank must be 'auto' or an integer"),
        ({"--superlink": "https://x:9092"}, "without a scheme"),
        ({"--superlink": "localhost"}, "--superlink must be HOST:PORT"),
        ({"--superlink": "host:70000"}, "port must be in 1..65535"),
        ({"--root-cert": "/nonexistent/ca.crt"}, "--root-cert /nonexistent/ca.crt: file not found"),
        ({"--key": "/nonexistent/node.key"}, "--key /nonexistent/node.key: file not found"),
        ({"--data": "./missing.jsonl"}, "--data ./missing.jsonl: not found"),
        ({"--model": "no such preset"}, "neither an existing path nor a preset name"),
        ({"--threads": "0"}, "--threads must be at least 1, got 0"),
        ({"--prompt-window": "-1"}, "--prompt-window must be a number of seconds >= 0, got -1.0"),
        ({"--prompt-window": "nan"}, "--prompt-window must be a number of seconds >= 0, got nan"),
    ],
)
def test_invalid_inputs_are_refused_naming_the_value(certs: CertPaths, override: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", "\\(").replace(".", "\\.")):
        parse_options(_args(certs, **override))


def test_a_certificate_is_not_a_key_and_a_key_is_not_a_certificate(certs: CertPaths) -> None:
    with pytest.raises(UsageError, match="not an unencrypted OpenSSH private key"):
        parse_options(_args(certs, **{"--key": str(certs.ca_cert)}))
    with pytest.raises(UsageError, match="not a PEM certificate"):
        parse_options(_args(certs, **{"--root-cert": str(certs.nodes[0].private)}))


def test_partition_options_go_together(certs: CertPaths) -> None:
    with pytest.raises(UsageError, match="go together"):
        parse_options([*_args(certs), "--partition-id", "0"])
    with pytest.raises(UsageError, match="0 <= --partition-id < --num-partitions"):
        parse_options([*_args(certs), "--partition-id", "2", "--num-partitions", "2"])


def test_main_logs_one_line_and_exits_2_on_bad_input(certs: CertPaths, caplog: pytest.LogCaptureFixture) -> None:
    assert main(_args(certs, **{"--rank": "-3"})) == 2
    assert main(_args(certs, **{"--key": "/nonexistent.key"})) == 2

    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "error: --rank must be 'auto' or an integer in 1..1024, got '-3'",
        "error: --key /nonexistent.key: file not found",
    ]


def test_node_config_round_trips_through_flowers_parser(certs: CertPaths, tmp_path: Path) -> None:
    data = tmp_path / "it's data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    state = tmp_path / "state dir"
    opts = parse_options(
        [*_args(certs, **{"--data": str(data), "--name": "dev 1"}), "--partition-id", "1", "--num-partitions", "3"]
        + ["--state-dir", str(state)]
    )

    parsed = parse_config_args([node_config_string(opts.node_config(rank=8))])

    assert parsed == {
        "lora-rank": 8,
        "model": "tiny",
        "data": str(data),
        "node-name": "dev 1",
        "partition-id": 1,
        "num-partitions": 3,
        "state-dir": str(state),
    }
    assert state.is_dir()


def test_node_config_refuses_strings_flower_cannot_carry() -> None:
    with pytest.raises(UsageError, match="both quote kinds"):
        node_config_string({"model": 'it\'s "quoted"'})


def test_supernode_command_has_tls_auth_port_and_node_config(certs: CertPaths) -> None:
    opts = parse_options(_args(certs, **{"--superlink": "[::1]:9092", "--prompt-window": "0"}))

    command = supernode_command(opts, rank=4, runtime_port=9999)
    prompt = supernode_command(parse_options(_args(certs, **{"--superlink": "[::1]:9092"})), 4, 9999)

    assert command[0].endswith("flower-supernode")  # --prompt-window 0: Flower's SuperNode as it is
    assert prompt == [sys.executable, "-m", "client.supernode_poll", "--prompt-window", "10", "--", *command[1:]]
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--superlink"] == "[::1]:9092"
    assert flags["--root-certificates"] == str(certs.ca_cert)
    assert flags["--auth-supernode-private-key"] == str(certs.nodes[0].private)
    assert flags["--port"] == "9999"
    assert "lora-rank=4" in flags["--node-config"] and "node-name='node-0'" in flags["--node-config"]


@pytest.mark.parametrize(
    ("lines", "kind", "text"),
    [
        (REFUSED_LOG, FailureKind.NODE_REFUSED, "flwr supernode register node-0.pub"),
        (NO_KEY_LOG, FailureKind.NODE_REFUSED, "code: 2001"),
        (TLS_LOG, FailureKind.CERTIFICATE, "CERTIFICATE_VERIFY_FAILED"),
        (UNREACHABLE_LOG, FailureKind.UNREACHABLE, "Connection refused"),
        (["Exit Code: 606\n", "Incompatible runtime version\n"], FailureKind.FAILED, "Flower exit code 606"),
    ],
)
def test_supernode_exits_map_to_failures(lines: list[str], kind: FailureKind, text: str) -> None:
    failure = classify_supernode_exit(1, lines, Path("/k/node-0.key"), stopping=False)

    assert failure is not None and failure.kind is kind
    assert text in failure.message and "\n" not in failure.message
    assert failure.kind.retry == (kind is FailureKind.UNREACHABLE)


def test_a_requested_stop_is_not_a_failure_and_an_unrequested_one_is() -> None:
    assert classify_supernode_exit(0, [], Path("k.key"), stopping=True) is None
    unrequested = classify_supernode_exit(0, ["SuperNode terminated gracefully.\n"], Path("k.key"), stopping=False)
    assert unrequested is not None and "unregister" in unrequested.message


@contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """Serve TLS handshakes on 127.0.0.1 with ``cert`` until the block ends; yield the port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    context.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_probe_accepts_the_right_ca(certs: CertPaths) -> None:
    with tls_server(certs.server_cert, certs.server_key) as port:
        assert probe_superlink("127.0.0.1", port, certs.ca_cert, timeout=5) is None
        assert probe_superlink("localhost", port, certs.ca_cert, timeout=5) is None


def test_probe_reports_a_wrong_ca(certs: CertPaths, tmp_path: Path) -> None:
    other = create_certs(tmp_path, nodes=0)[0]
    with tls_server(certs.server_cert, certs.server_key) as port:
        failure = probe_superlink("127.0.0.1", port, other.ca_cert, timeout=5)

    assert failure is not None and failure.kind is FailureKind.CERTIFICATE
    assert "is not signed by" in failure.message


def test_probe_reports_a_certificate_for_another_host(certs: CertPaths, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key, cert = issue_server_certificate(ca_key, ca_cert, ["other.example"])  # type: ignore[arg-type]
    write_file(tmp_path / "s.crt", pem_certificate(cert), private=False, overwrite=False)
    write_file(tmp_path / "s.key", pem_private_key(key), private=True, overwrite=False)

    with tls_server(tmp_path / "s.crt", tmp_path / "s.key") as port:
        failure = probe_superlink("127.0.0.1", port, certs.ca_cert, timeout=5)

    assert failure is not None and failure.kind is FailureKind.CERTIFICATE
    assert "not valid for '127.0.0.1'" in failure.message and "other.example" in failure.message


def test_probe_reports_nothing_listening_as_unreachable(certs: CertPaths) -> None:
    failure = probe_superlink("127.0.0.1", free_port(), certs.ca_cert, timeout=5)

    assert failure is not None and failure.kind is FailureKind.UNREACHABLE and failure.kind.retry


class _FakeCuda:
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def mem_get_info(device: int = 0) -> tuple[int, int]:
        return 3 * GIB, 80 * GIB

    @staticmethod
    def get_device_name(device: int = 0) -> str:
        return "Fake GPU"


def test_free_memory_prefers_free_cuda_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch = types.SimpleNamespace(cuda=_FakeCuda())
    monkeypatch.setitem(sys.modules, "torch", fake_torch)

    free, where = free_memory()

    assert free == 3 * GIB and "CUDA device 0 (Fake GPU)" in where


def test_free_memory_falls_back_to_available_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", no_cuda)

    free, where = free_memory()

    assert free > 0 and where == "available system RAM"
