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
