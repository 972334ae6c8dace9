import json

import pytest

from ktel import config


def test_defaults_are_valid(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    cfg = config.load()
    assert cfg.kafka.raw_retention_hours == 168
    assert cfg.aggregate.window_seconds == 10


def test_env_overrides_file(tmp_path, monkeypatch):
    f = tmp_path / "k.toml"
    f.write_text("[aggregate]\nwindow_seconds = 5\ndirectory_depth = 4\n")
    monkeypatch.setenv("KTEL_AGGREGATE__WINDOW_SECONDS", "2")
    cfg = config.load(f)
    assert cfg.aggregate.window_seconds == 2
    assert cfg.aggregate.directory_depth == 4


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[agent]\nringbuf_pages = 100\n",
            "agent.ringbuf_pages = 100: Value error, 100 is not a power of two",
        ),
        ("[kafka]\nbootstrap = 'nohost'\n", "kafka.bootstrap = 'nohost'"),
        ("[aggregate]\nwindow_seconds = 0\n", "KTEL_AGGREGATE__WINDOW_SECONDS"),
        ("[process]\nsession_timeout_seconds = 3\n", "process.session_timeout_seconds = 3"),
        ("[agent]\nprobes = ['nope']\n", "agent.probes = ['nope']: Value error, unknown probe 'nope'"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection"),
        ("[enrich]\nmax_processes = 100000\n", "KTEL_ENRICH__MAX_PROCESSES"),
        ("[enrich]\nmetadata_file = '/tmp'\n", "enrich.metadata_file = '/tmp': Value error, is a directory"),
        (
            "[stack]\ncollector_binary = '/no/otelcol'\n",
            "stack.collector_binary = '/no/otelcol': Value error, is not an executable file",
        ),
    ],
)
def test_bad_config_names_field_and_fix(tmp_path, toml, expected):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert expected in str(err.value)


def test_unparseable_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[agent\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(f)


@pytest.mark.parametrize("field", ["metrics_port", "data_dir", "session_timeout_seconds"])
def test_worker_settings_under_their_old_aggregate_names_are_refused_in_the_file(tmp_path, field):
    f = tmp_path / "old.toml"
    f.write_text(f"[aggregate]\nwindow_seconds = 5\n{field} = 30\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert f"aggregate.{field} moved to process.{field} (KTEL_PROCESS__{field.upper()})" in str(err.value)


def test_worker_settings_under_their_old_aggregate_names_are_refused_in_the_environment(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_AGGREGATE__METRICS_PORT", "0")
    with pytest.raises(config.ConfigError) as err:
        config.load()
    moved = "aggregate.metrics_port moved to process.metrics_port (KTEL_PROCESS__METRICS_PORT)"
    assert moved in str(err.value)


def test_worker_settings_apply_from_the_process_section(tmp_path, monkeypatch):
    f = tmp_path / "k.toml"
    f.write_text("[process]\nmetrics_port = 0\nsession_timeout_seconds = 10\n")
    monkeypatch.setenv("KTEL_PROCESS__DATA_DIR", str(tmp_path))
    cfg = config.load(f)
    assert (cfg.process.metrics_port, cfg.process.session_timeout_seconds) == (0, 10)
    assert cfg.process.data_dir == tmp_path


TOKEN = "Bearer s3cret-t0ken"


def test_ktel_config_masks_secrets_in_its_output_only(tmp_path, monkeypatch, capsys):
    from ktel import cli

    f = tmp_path / "k.toml"
    f.write_text(f'[otlp]\nheaders = {{authorization = "{TOKEN}", "x-tenant" = "t1"}}\n')
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    cli.main(["--config", str(f), "config"])
    out = capsys.readouterr().out
    assert TOKEN not in out and "t1" not in out
    printed = json.loads(out)
    assert printed["otlp"]["headers"] == {"authorization": "***", "x-tenant": "***"}
    assert printed["agent"]["host_id"] == "abc"  # what is not a secret is printed as it is
    assert config.load(f).otlp.headers == {"authorization": TOKEN, "x-tenant": "t1"}  # used as given


def test_every_secret_field_is_masked_and_unset_ones_stay_null(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    printed = config.printable(config.load())
    assert printed["otlp"]["headers"] is None
    secrets = [
        f"{section}.{name}"
        for section, model in config.Config.model_fields.items()
        for name, field in (model.annotation.model_fields.items() if model.annotation else [])
        if field.json_schema_extra == config.SECRET
    ]
    assert secrets == ["kafka.sasl_password", "otlp.headers"]


def test_a_bad_secret_is_not_shown_in_the_error(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_OTLP__HEADERS", json.dumps({"authorization": [TOKEN]}))
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert "otlp.headers.authorization = ***: Input should be a valid string" in str(err.value)
    assert TOKEN not in str(err.value)


def test_the_table_store_is_on_disk_by_default_and_a_wrong_one_is_named(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    assert config.load().process.table_store == "rocksdict"
    monkeypatch.setenv("KTEL_PROCESS__TABLE_STORE", "rocksdb")
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert "table_store" in str(err.value) and "KTEL_PROCESS__TABLE_STORE" in str(err.value), err.value
    assert "'rocksdict' or 'memory'" in str(err.value)
