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
        (
            "[agent]\nread_interval_ms = 0\n",
            "agent.read_interval_ms = 0: Value error, 0 ms is out of range: from 1 to 1000",
        ),
        ("[agent]\nread_interval_ms = 5000\n", "(set it in the file or with KTEL_AGENT__READ_INTERVAL_MS)"),
        (
            "[agent]\nbatch_max_ms = 100000000000\n",
            "agent.batch_max_ms = 100000000000: Value error, 100000000000 ms is out of range",
        ),
        ("[agent]\nbatch_max_ms = 'abc'\n", "KTEL_AGENT__BATCH_MAX_MS"),
        ("[agent]\nbatch_max_ms = 0\n", "from 1 to 60000"),
        (
            "[agent]\nbatch_hold_ms = 0\n",
            "agent.batch_hold_ms = 0: Value error, 0 ms is out of range: from 1 to 60000",
        ),
        (
            "[agent]\nbatch_min_events = 6000\n",
            "agent.batch_min_events (6000) is above agent.batch_max_events (5000), where a batch is sealed",
        ),
        ("[agent]\nbatch_max_bytes = 16777216\n", "batch_max_bytes = 16777216: Input should be less than"),
        ("[kafka]\nbootstrap = 'nohost'\n", "kafka.bootstrap = 'nohost'"),
        ("[aggregate]\nwindow_seconds = 0\n", "KTEL_AGGREGATE__WINDOW_SECONDS"),
        (
            "[aggregate]\nrefresh_seconds = 290\nwindow_seconds = 10\n",
            "refresh_seconds (290) plus window_seconds (10) must be below 300",
        ),
        ("[remote_write]\nhistograms = 'sparse'\n", "KTEL_REMOTE_WRITE__HISTOGRAMS"),
        ("[otlp]\nhistograms = 'native'\n", "otlp.histograms = 'native'"),
        ("[process]\nsession_timeout_seconds = 3\n", "process.session_timeout_seconds = 3"),
        (
            "[process]\nmax_hosts = 0\n",
            "process.max_hosts = 0: Value error, must be from 1 to 1000000: the most hosts one worker "
            "holds; to serve more hosts, run more workers",
        ),
        ("[process]\nmax_hosts = 2000000\n", "(set it in the file or with KTEL_PROCESS__MAX_HOSTS)"),
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
    assert secrets == [
        "kafka.sasl_password",
        "remote_write.basic_auth_password",
        "remote_write.headers",
        "otlp.headers",
    ]


def test_a_bad_secret_is_not_shown_in_the_error(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_OTLP__HEADERS", json.dumps({"authorization": [TOKEN]}))
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert "otlp.headers.authorization = ***: Input should be a valid string" in str(err.value)
    assert TOKEN not in str(err.value)


@pytest.mark.parametrize(
    ("section", "toml", "expected"),
    [
        (
            "remote_write",
            "basic_auth_username = 'u'",
            "remote_write.basic_auth_username needs remote_write.basic_auth_password "
            "(KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD) or remote_write.basic_auth_password_file",
        ),
        (
            "remote_write",
            "basic_auth_password = 'p'",
            "remote_write.basic_auth_password(_file) needs remote_write.basic_auth_username",
        ),
        (
            "remote_write",
            "basic_auth_username = 'u'\nbasic_auth_password = 'p'\nbasic_auth_password_file = '{f}'",
            "remote_write.basic_auth_password and remote_write.basic_auth_password_file: set one",
        ),
        (
            "remote_write",
            "basic_auth_username = 'u'\nbasic_auth_password = 'p'\nbearer_token_file = '{f}'",
            "both set the Authorization header: set one",
        ),
        (
            "remote_write",
            "url = 'https://r/api/v1/write'\ntls_cert_file = '{f}'",
            "remote_write.tls_cert_file and remote_write.tls_key_file go together (mutual TLS)",
        ),
        (
            "remote_write",
            "tls_ca_file = '{f}'",
            "remote_write.tls_* settings apply to an https:// url, and remote_write.url = "
            "'http://127.0.0.1:9090/api/v1/write': make it https://",
        ),
        (
            "remote_write",
            "headers = {{Authorization = 'Bearer x'}}",
            "header 'Authorization' is set by ktel itself",
        ),
        (
            "remote_write",
            "headers = {{content-type = 'text/plain'}}",
            "header 'content-type' is set by ktel itself",
        ),
        (
            "otlp",
            "bearer_token_file = '{f}'\nheaders = {{Authorization = 'Bearer x'}}",
            "otlp.headers has an Authorization header and otlp.bearer_token_file sets it too: remove one",
        ),
    ],
)
def test_bad_credentials_name_the_fields_and_the_fix(tmp_path, section, toml, expected):
    secret = tmp_path / "secret"
    secret.write_text("x")
    f = tmp_path / "bad.toml"
    f.write_text(f"[{section}]\n" + toml.format(f=secret) + "\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert expected in str(err.value)
    assert "'p'" not in str(err.value)  # a password in a section-wide error is not shown


def test_remote_write_password_comes_from_the_environment_or_a_file_read_each_time(tmp_path, monkeypatch):
    f = tmp_path / "k.toml"
    f.write_text("[remote_write]\nbasic_auth_username = 'ktel'\n")
    monkeypatch.setenv("KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD", TOKEN)
    assert config.load(f).remote_write.password() == TOKEN
    assert TOKEN not in json.dumps(config.printable(config.load(f)))
    monkeypatch.delenv("KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD")
    password = tmp_path / "password"
    password.write_text("first\n")
    f.write_text(f"[remote_write]\nbasic_auth_username = 'ktel'\nbasic_auth_password_file = '{password}'\n")
    rw = config.load(f).remote_write
    assert rw.password() == "first"
    password.write_text("second\n")
    assert rw.password() == "second"


def test_a_certificate_file_that_is_not_pem_stops_the_exporter_naming_the_settings(
    tmp_path, monkeypatch, capsys
):
    from ktel import cli

    cert = tmp_path / "exporter.crt"
    cert.write_text("not a certificate\n")
    f = tmp_path / "k.toml"
    f.write_text(
        "[remote_write]\nurl = 'https://r:9090/api/v1/write'\nmetrics_port = 0\n"
        f"tls_cert_file = '{cert}'\ntls_key_file = '{cert}'\n"
    )
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", str(f), "export", "remote-write"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "remote_write.tls_ca_file, tls_cert_file or tls_key_file is not usable PEM" in err
    assert "Traceback" not in err


def test_the_table_store_is_on_disk_by_default_and_a_wrong_one_is_named(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    assert config.load().process.table_store == "rocksdict"
    monkeypatch.setenv("KTEL_PROCESS__TABLE_STORE", "rocksdb")
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert "table_store" in str(err.value) and "KTEL_PROCESS__TABLE_STORE" in str(err.value), err.value
    assert "'rocksdict' or 'memory'" in str(err.value)


HTTPS = "url = 'https://r/api/v1/write'\n"


@pytest.mark.parametrize(
    ("section", "field", "toml"),
    [
        ("remote_write", "bearer_token_file", HTTPS),
        ("remote_write", "basic_auth_password_file", HTTPS + "basic_auth_username = 'u'\n"),
        ("remote_write", "tls_ca_file", HTTPS),
        ("otlp", "bearer_token_file", ""),
    ],
)
def test_an_exporters_unreadable_file_is_refused_when_it_starts_not_when_any_process_loads(
    tmp_path, section, field, toml
):
    """One config serves every process (the Helm chart's one ConfigMap), and an exporter's
    credentials are mounted only where it runs: the agent must still load it."""
    f = tmp_path / "k.toml"
    f.write_text(f"[{section}]\n{toml}{field} = '/nonexistent/file'\n")
    cfg = config.load(f)  # every process loads it
    model = getattr(cfg, section)
    with pytest.raises(config.ConfigError) as err:
        config.check_readable(section, model, model.FILES)  # the exporter's start
    assert f"{section}.{field} = '/nonexistent/file': cannot be read" in str(err.value)


def test_a_host_id_that_means_every_host_is_refused(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "*")
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert "host_id" in str(err.value) and "means every host in ktel.control" in str(err.value), err.value
