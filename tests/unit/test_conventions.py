"""ktel's conventions: host.arch values, service.name and OTEL_* on OTLP resources,
--version, global options after the command, log level and format."""

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

from edge_agent.identity import host_arch
from exporters import otlp
from ktel import config


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "amd64"), ("aarch64", "arm64"), ("s390x", "s390x"), ("riscv64", "riscv64")],
)
def test_host_arch_is_the_semantic_conventions_value(machine, arch):
    assert host_arch(machine) == arch


def test_service_name_comes_from_the_setting(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod,team=kernel")
    attrs = otlp.service_attributes("ktel-eu")
    assert attrs == {"service.name": "ktel-eu", "deployment.environment.name": "prod", "team": "kernel"}


def test_otel_variables_win_over_the_setting(monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert otlp.service_attributes("ktel")["service.name"] == "from-attributes"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-service-name")
    assert otlp.service_attributes("ktel")["service.name"] == "from-service-name"


def test_metric_resources_carry_the_service_and_keep_the_host():
    rows = [(1000, ["file_created_total", "counter", {"host.id": "a", "directory": "/tmp"}, 5])]
    req = encode_metrics(otlp.to_metrics(rows, service={"service.name": "ktel", "host.id": "not-this"}))
    [rm] = req.resource_metrics
    got = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    assert got == {"service.name": "ktel", "host.id": "a"}


def test_a_series_without_a_host_under_the_services_host_is_sent_with_that_hosts_series():
    """The resources of the two are equal, and the SDK's encoder keeps one group of
    metrics per resource: each went in a group of its own, and one of them was lost."""
    service = {"service.name": "ktel", "host.id": "a"}
    rows = [(1000, ["x", "gauge", {}, 1]), (1000, ["y", "gauge", {"host.id": "a"}, 2])]
    [rm] = otlp.metric_request(rows, service=service).resource_metrics
    assert {kv.key: kv.value.string_value for kv in rm.resource.attributes} == service
    assert [m.name for sm in rm.scope_metrics for m in sm.metrics] == ["x", "y"]


def test_service_section_from_environment(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_SERVICE__METRICS_BIND", "0.0.0.0")
    monkeypatch.setenv("KTEL_SERVICE__LOG_LEVEL", "DEBUG")
    cfg = config.load()
    assert (cfg.service.name, cfg.service.metrics_bind, cfg.service.log_level) == ("ktel", "0.0.0.0", "debug")


def test_a_bad_bind_address_names_the_field(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_SERVICE__METRICS_BIND", "all")
    with pytest.raises(config.ConfigError, match=r"service.metrics_bind = 'all': .*not an IP address"):
        config.load()


def test_a_bad_log_format_names_the_field(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_SERVICE__LOG_FORMAT", "xml")
    with pytest.raises(config.ConfigError, match=r"service.log_format = 'xml'.*KTEL_SERVICE__LOG_FORMAT"):
        config.load()


def ktel(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktel.cli", *args],
        env={**os.environ, "KTEL_AGENT__HOST_ID": "abc", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version_is_the_package_version():
    out = ktel("--version")
    assert (out.returncode, out.stdout) == (0, f"ktel {version('ktel')}\n")


def test_global_options_after_the_command(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text("[aggregate]\nwindow_seconds = 7\n")
    for args in (["config", "--config", str(f)], ["--config", str(f), "config"]):
        out = ktel(*args)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["aggregate"]["window_seconds"] == 7


def test_log_level_and_json_format_from_config_and_the_flag_winning(tmp_path):
    # ktel status against a closed port logs aiokafka's connection error, and an
    # info line first only at info level or below.
    closed = "127.0.0.1:1"
    env = {"KTEL_KAFKA__BOOTSTRAP": closed, "KTEL_SERVICE__LOG_FORMAT": "json"}
    quiet = ktel("status", "--timeout", "3", **env, KTEL_SERVICE__LOG_LEVEL="error")
    assert quiet.returncode == 2
    records = [json.loads(line) for line in quiet.stderr.splitlines() if line.startswith("{")]
    assert records and {r["level"] for r in records} == {"ERROR"}
    assert {"time", "logger", "message"} <= set(records[0])
    assert "ktel status: cannot reach Kafka at 127.0.0.1:1" in quiet.stderr
    loud = ktel("status", "--timeout", "3", "--log-level", "debug", **env, KTEL_SERVICE__LOG_LEVEL="error")
    levels = {json.loads(line)["level"] for line in loud.stderr.splitlines() if line.startswith("{")}
    assert "DEBUG" in levels


@pytest.mark.parametrize("bad", [["--watch", "0"], ["--stale-after", "-5"], ["--since", "soon"]])
def test_status_refuses_durations_that_are_not_above_zero(bad):
    out = ktel("status", *bad)
    assert out.returncode == 2
    assert f"argument {bad[0]}" in out.stderr and "seconds" in out.stderr
