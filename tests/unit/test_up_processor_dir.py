"""What `ktel up` gives its children: the worker's on-disk table copies kept with its own
Kafka, and no setting meant for another OTLP backend."""

from __future__ import annotations

from ktel import config
from ktel.up import Stack


def test_the_worker_of_ktel_up_keeps_its_tables_under_the_stacks_data_dir(tmp_path):
    cfg = config.Config(agent=config.AgentConfig(host_id="h"), stack=config.StackConfig(data_dir=tmp_path))
    env = Stack(cfg).child_env()
    # Not process.data_dir's default, shared by every stack on the machine: a copy of
    # another stack's changelog would not match this stack's Kafka.
    assert env["KTEL_PROCESS__DATA_DIR"] == str(tmp_path / "processor")


def test_ktel_ups_otlp_exporter_sends_no_production_token_to_the_local_collector(tmp_path, monkeypatch):
    token = tmp_path / "prod-token"
    token.write_text("prod\n")
    cfg = config.Config(
        agent=config.AgentConfig(host_id="h"),
        stack=config.StackConfig(data_dir=tmp_path),
        otlp=config.OtlpConfig(bearer_token_file=token),
    )
    monkeypatch.setenv("KTEL_OTLP__BEARER_TOKEN_FILE", Stack(cfg).child_env()["KTEL_OTLP__BEARER_TOKEN_FILE"])
    f = tmp_path / "k.toml"
    f.write_text(f"[otlp]\nbearer_token_file = '{token}'\n")
    assert config.load(f).otlp.bearer_token_file is None  # what the child loads


def test_ktel_ups_remote_write_exporter_takes_no_production_credentials_or_tls(tmp_path, monkeypatch):
    ca, password = tmp_path / "prod-ca.pem", tmp_path / "prod-password"
    ca.write_text("ca\n")
    password.write_text("prod\n")
    f = tmp_path / "k.toml"
    f.write_text(
        "[remote_write]\nurl = 'https://prom.example/api/v1/write'\n"
        f"tls_ca_file = '{ca}'\nbasic_auth_username = 'ktel'\nbasic_auth_password_file = '{password}'\n"
    )
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_STACK__DATA_DIR", str(tmp_path))
    env = Stack(config.load(f)).child_env()
    for name, value in env.items():
        if name.startswith("KTEL_"):
            monkeypatch.setenv(name, value)
    # What the child loads: the local Prometheus' plain http:// url held with the production
    # TLS settings was refused, so the child stopped; and its credentials went to it.
    rw = config.load(f).remote_write
    assert rw.url.startswith("http://127.0.0.1:")
    assert (rw.tls_ca_file, rw.basic_auth_username, rw.basic_auth_password_file) == (None, None, None)


def test_ktel_ups_otlp_exporter_sends_no_production_headers_to_the_local_collector(tmp_path, monkeypatch):
    f = tmp_path / "k.toml"
    f.write_text("[otlp]\nheaders = {authorization = 'Bearer prod'}\n")
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_STACK__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KTEL_OTLP__HEADERS", Stack(config.load(f)).child_env()["KTEL_OTLP__HEADERS"])
    assert not config.load(f).otlp.headers  # what the child loads


def test_ktel_ups_remote_write_exporter_sends_no_production_headers_to_the_local_prometheus(
    tmp_path, monkeypatch
):
    f = tmp_path / "k.toml"
    f.write_text("[remote_write]\nheaders = {X-Scope-OrgID = 'prod'}\n")
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_STACK__DATA_DIR", str(tmp_path))
    env = Stack(config.load(f)).child_env()
    monkeypatch.setenv("KTEL_REMOTE_WRITE__HEADERS", env["KTEL_REMOTE_WRITE__HEADERS"])
    assert config.load(f).remote_write.headers == {}  # what the child loads
