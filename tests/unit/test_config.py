import json
from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import pytest
from pydantic import SecretStr

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
        (
            "[service]\nname = 2024\n",
            "service.name = 2024: a string is wanted, and this is a number: write it in quotes in the "
            'file (name = "2024"); in the Helm chart\'s values, quote it too, or give it with '
            "--set-string instead of --set",
        ),
        (
            "[agent]\nprobes = ['file_created', 7]\n",
            "agent.probes.1 = 7: a string is wanted, and this is a number: write it in quotes in the "
            'file ("7")',
        ),
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
        (
            "[agent]\ncompression = 'none'\nspool_max_mb = 1\n",
            "agent.spool_max_mb (1) cannot hold a batch of agent.batch_max_bytes (1048576), which "
            "agent.compression = 'none' spools uncompressed: the spool would drop every batch that large, "
            "counted, however empty; raise agent.spool_max_mb to at least 2, lower agent.batch_max_bytes "
            "to at most 1048448, or set agent.compression = 'zstd'",
        ),
        ("[agent]\ncompression = 'lz4'\nspool_max_mb = 4\nbatch_max_bytes = 8388608\n", "at least 9"),
        ("[kafka]\nbootstrap = 'nohost'\n", "kafka.bootstrap = 'nohost'"),
        ("[aggregate]\nwindow_seconds = 0\n", "KTEL_AGGREGATE__WINDOW_SECONDS"),
        (
            "[aggregate]\nhost_ttl_seconds = 0.0001\n",
            "aggregate.host_ttl_seconds = 0.0001: Value error, is below 1 s: the workers look for silent "
            "hosts every quarter of it",
        ),
        (
            "[aggregate]\nhost_ttl_seconds = 0\n",
            "(set it in the file or with KTEL_AGGREGATE__HOST_TTL_SECONDS)",
        ),
        (
            "[aggregate]\nrefresh_seconds = 290\nwindow_seconds = 10\n",
            "refresh_seconds (290) plus window_seconds (10) must be below 300",
        ),
        ("[remote_write]\nhistograms = 'sparse'\n", "KTEL_REMOTE_WRITE__HISTOGRAMS"),
        ("[otlp]\nhistograms = 'native'\n", "otlp.histograms = 'native'"),
        ("[process]\nsession_timeout_seconds = 3\n", "process.session_timeout_seconds = 3"),
        (
            "[process]\nmax_state_bytes = 1000000\n",
            "process.max_state_bytes = 1000000: Input should be less than or equal to 990000",
        ),
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
        ("[agent]\nlibc_path = '/tmp'\n", "agent.libc_path = '/tmp': Value error, is a directory"),
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
        ("otlp", "certificate_file", ""),
        ("otlp", "client_key_file", ""),
        ("otlp", "client_certificate_file", ""),
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
    assert "agent.host_id = '*'" in str(err.value), err.value
    assert "host id '*' is ktel.control's every-host target" in str(err.value), err.value


LONG_HOST = "h" * 300


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        # A misspelt setting, section or table key would silently not apply.
        (
            "[agent]\nbatch_max_event = 5\n",
            "agent.batch_max_event: not a setting of agent (in the file, or KTEL_AGENT__BATCH_MAX_EVENT "
            "in the environment): did you mean batch_max_events?",
        ),
        (
            "[agent]\nredact = [{kind = 'file_created', field = 'path', pattern = 'x', replacment = 'y'}]\n",
            "agent.redact.0.replacment: not a setting of agent.redact.0 (in the file, or "
            "KTEL_AGENT__REDACT (the whole list, as JSON) in the environment)",
        ),
        # No variable names a list's item: KTEL_AGENT__REDACT__0__PATTERN is refused as not a list.
        (
            "[agent]\nredact = [{kind = 'file_created', field = 'path', pattern = '('}]\n",
            "not a valid regular expression: missing ), unterminated subpattern at position 0 (set it "
            "in the file or with KTEL_AGENT__REDACT (the whole list, as JSON))",
        ),
        ("[kafka.principals]\nagnet = 'User:a'\n", "did you mean agent?"),
        (
            "[agnt]\nx = 1\n",
            "agnt: not a section of ktel's configuration: did you mean agent? the sections are",
        ),
        # TOML's true is Python's 1, its 0 and 1 are pydantic's false and true.
        (
            "[kafka]\nraw_partitions = true\n",
            "kafka.raw_partitions = True: Value error, is true or false, not a number: give a number",
        ),
        ("[agent]\nsample_every = {file_created = true}\n", "'file_created' is true or false, not a number"),
        (
            "[agent]\nsample_every = {file_created = 4294967296}\n",
            "file_created = 4294967296: a rate is 1 in N with N from 1 to 4294967295",
        ),
        (
            "[aggregate]\ninclude_filename = 1\n",
            "aggregate.include_filename = 1: Value error, is a number, not true or false",
        ),
        (
            "[kafka]\nraw_retention_hours = inf\n",
            "kafka.raw_retention_hours = inf: Input should be a finite number",
        ),
        (
            "[sample]\nbudget_per_s = {file_created = nan}\n",
            "sample.budget_per_s.file_created = nan: Input should be a finite",
        ),
        (
            "[sample]\nbudget_per_s = {file_created = -5}\n",
            "sample.budget_per_s.file_created = -5: Input should be greater than 0",
        ),
        (
            "[agent]\nspool_max_mb = 1000000000000000000000000000000\n",
            "agent.spool_max_mb = 10000000000000000000000",
        ),
        (
            "[agent]\nspool_max_mb = 1000000000000000000000000000000\n",
            "is too large: at most 9223372036854775807",
        ),
        # Bounds of what reads them: Kafka's protocol, the wire, the agents, gRPC.
        ("[kafka]\nraw_partitions = 3000000000\n", "less than or equal to 2147483647"),
        (
            "[kafka]\nreplication_factor = 40000\n",
            "kafka.replication_factor = 40000: Value error, 40000: give from 1",
        ),
        (
            "[kafka]\ndlq_retention_hours = 1e300\n",
            "kafka.dlq_retention_hours = 1e+300: Input should be less than",
        ),
        (
            "[agent]\nbatch_max_events = 200000\n",
            "agent.batch_max_events = 200000: Input should be less than or equal to 100000",
        ),
        (
            f"[agent]\nhost_id = '{LONG_HOST}'\n",
            "host id of 300 characters is longer than the 256 a host id may take: set agent.host_id",
        ),
        (f"[agent]\nhost_id = '{LONG_HOST}'\n", f"agent.host_id = '{LONG_HOST[:79]}... (300 characters)"),
        (
            "[sample]\ncommand_ttl_seconds = 1000000\n",
            "sample.command_ttl_seconds = 1000000: Input should be less than",
        ),
        (
            "[otlp]\ntimeout_seconds = 10000\n",
            "otlp.timeout_seconds = 10000: Input should be less than or equal to 3600",
        ),
        # Durations long enough never to come round, or to overflow what they are counted in.
        (
            "[agent]\nheartbeat_seconds = 1e12\n",
            "agent.heartbeat_seconds = 1000000000000.0: Input should be less than or equal to 3600",
        ),
        # Short enough to flood ktel.heartbeats and the workers that read it.
        (
            "[agent]\nheartbeat_seconds = 0.0001\n",
            "agent.heartbeat_seconds = 0.0001: Input should be greater than or equal to 1 "
            "(set it in the file or with KTEL_AGENT__HEARTBEAT_SECONDS)",
        ),
        (
            "[sample]\nwindow_seconds = 1e300\n",
            "sample.window_seconds = 1e+300: Input should be less than or",
        ),
        (
            "[enrich]\nexit_grace_seconds = 1e300\n",
            "enrich.exit_grace_seconds = 1e+300: Input should be less",
        ),
        ("[kafka]\nbootstrap = 'k:70000'\n", "'k:70000' is not host:port (a port from 1 to 65535)"),
        # A listener's URL: its scheme was taken for part of the host, retried for good.
        (
            "[kafka]\nbootstrap = 'k:9092,SASL_SSL://kafka:9093'\n",
            "'SASL_SSL://kafka:9093' is not host:port: give it without a scheme",
        ),
        (
            "[remote_write]\nurl = 'prometheus:9090'\n",
            "remote_write.url = 'prometheus:9090': Value error, give an http://",
        ),
        # Text: empty, too long, with a NUL.
        ("[kafka]\nssl_cafile = ''\n", "kafka.ssl_cafile = '': Value error, is empty: give a value"),
        ("[pull]\nhost = ''\n", "pull.host = '': Value error, is empty"),
        # A port or brackets with the address: the endpoint took it for an IPv6 one.
        (
            "[pull]\nhost = '0.0.0.0:9464'\n",
            "pull.host = '0.0.0.0:9464': Value error, is not an address or a host name: give the "
            "address alone",
        ),
        ("[pull]\nhost = '[::]'\n", "pull.host = '[::]': Value error, is not an address"),
        (
            "[remote_write]\nheaders = {X-Scope-OrgID = ''}\n",
            "remote_write.headers: Value error, 'X-Scope-OrgID' is empty",
        ),
        ('[agent]\nstate_dir = "/var/lib/ktel\\u0000x"\n', "Value error, holds a NUL character"),
        (f"[service]\nname = '{'n' * 70000}'\n", "is 70000 characters long: give at most 65536"),
        # Paths: a file where a directory is meant, and the reverse; a name too long.
        ("[process]\ndata_dir = '{file}'\n", "process.data_dir = '{file}': Value error, is not a directory"),
        (
            "[kafka]\nssl_cafile = '{dir}'\n",
            "kafka.ssl_cafile = '{dir}': Value error, is a directory: name the file",
        ),
        (
            "[otlp]\ncertificate_file = '{dir}'\n",
            "otlp.certificate_file = '{dir}': Value error, is a directory",
        ),
        (f"[stack]\ncollector_binary = '/{'b' * 300}'\n", "has a part longer than a file name may be"),
    ],
)
def test_a_mistaken_or_hostile_value_is_refused_naming_the_field(tmp_path, monkeypatch, toml, expected):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    if "host_id" in toml:
        monkeypatch.delenv("KTEL_AGENT__HOST_ID")
    (tmp_path / "a-file").write_text("x")
    where = {"file": tmp_path / "a-file", "dir": tmp_path}
    f = tmp_path / "bad.toml"
    f.write_text(toml.replace("{file}", str(where["file"])).replace("{dir}", str(where["dir"])))
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    said = str(err.value)
    assert expected.replace("{file}", str(where["file"])).replace("{dir}", str(where["dir"])) in said, said
    assert len(said) < 2000  # a huge value is not printed back whole


def _settings(want):
    """(section, field) of every setting whose annotation, through Optional and unions,
    takes one of the types in ``want`` (and not bool, when numbers are wanted)."""

    def types(annotation):
        if get_origin(annotation) is Annotated:
            return types(get_args(annotation)[0])
        if get_origin(annotation) in (Union, UnionType):
            return {t for a in get_args(annotation) for t in types(a)}
        return {annotation} if isinstance(annotation, type) else set()

    return [
        (section, name)
        for section, sfield in config.Config.model_fields.items()
        for name, field in sfield.annotation.model_fields.items()
        if types(field.annotation) & want and not (bool in types(field.annotation) and want & {int, float})
    ]


@pytest.mark.parametrize("section", list(config.Config.model_fields))
def test_every_section_refuses_a_setting_it_does_not_have(tmp_path, monkeypatch, section):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    f = tmp_path / "k.toml"
    f.write_text(f"[{section}]\nno_such_setting = 1\n")
    with pytest.raises(config.ConfigError, match=f"{section}.no_such_setting: not a setting of {section}"):
        config.load(f)


@pytest.mark.parametrize(("section", "name"), _settings({int, float}))
def test_every_number_refuses_true_and_false(tmp_path, monkeypatch, section, name):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    f = tmp_path / "k.toml"
    f.write_text(f"[{section}]\n{name} = true\n")
    with pytest.raises(
        config.ConfigError, match=f"{section}.{name} = True: .*is true or false, not a number"
    ):
        config.load(f)


@pytest.mark.parametrize(("section", "name"), _settings({float}))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_fraction_refuses_nan_and_infinity(tmp_path, monkeypatch, section, name, value):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv(f"KTEL_{section.upper()}__{name.upper()}", value)
    with pytest.raises(
        config.ConfigError, match=f"{section}.{name} = '{value}': Input should be a finite number"
    ):
        config.load()


# Where empty text means something (kafka.prefix: none).
EMPTY_MEANS_SOMETHING = [("kafka", "prefix")]


@pytest.mark.parametrize(
    ("section", "name"), [s for s in _settings({str, Path, SecretStr}) if s not in EMPTY_MEANS_SOMETHING]
)
def test_every_text_and_path_refuses_empty(tmp_path, monkeypatch, section, name):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv(f"KTEL_{section.upper()}__{name.upper()}", "")
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert f"{section}.{name} = " in str(err.value) and ": Value error, is empty" in str(err.value), err.value


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "KTEL_AGENT__PROBES",
            "file_created",
            "agent.probes: KTEL_AGENT__PROBES = 'file_created' is not JSON: give a JSON list",
        ),
        ("KTEL_SAMPLE__BUDGET_PER_S", "file_created=5", "give a JSON object"),
        (
            "KTEL_REMOTE_WRITE__HEADERS",
            TOKEN,
            "remote_write.headers: KTEL_REMOTE_WRITE__HEADERS = *** is not JSON",
        ),
        ("KTEL_AGENT__BATCH_MAX_EVENT", "5", "agent.batch_max_event: not a setting of agent"),
        (
            "KTEL_AGGREGATES__WINDOW_SECONDS",
            "2",
            "KTEL_AGGREGATES__WINDOW_SECONDS: aggregates is not a section of ktel's configuration: "
            "did you mean KTEL_AGGREGATE__...?",
        ),
        # One underscore between section and setting: read by nothing, so the default held.
        (
            "KTEL_AGGREGATE_WINDOW_SECONDS",
            "2",
            "KTEL_AGGREGATE_WINDOW_SECONDS: not read, as a section and its setting are joined by two "
            "underscores: did you mean KTEL_AGGREGATE__WINDOW_SECONDS?",
        ),
        ("KTEL_REMOTE_WRITE_URL", "http://x", "did you mean KTEL_REMOTE_WRITE__URL?"),
        # A whole section as one variable may carry the section's secrets.
        (
            "KTEL_REMOTE_WRITE",
            f'{{"headers": {{"authorization": "{TOKEN}"}},}}',
            "remote_write: KTEL_REMOTE_WRITE = *** is not JSON: give a JSON object",
        ),
        ("KTEL_KAFKA", f'{{"sasl_password": "{TOKEN}"', "kafka: KTEL_KAFKA = *** is not JSON"),
        ("KTEL_AGENT__REDACT", "[x]", "agent.redact: KTEL_AGENT__REDACT = '[x]' is not JSON"),
    ],
)
def test_a_bad_environment_variable_is_named_not_a_traceback(monkeypatch, variable, value, expected):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv(variable, value)
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert expected in str(err.value) and TOKEN not in str(err.value), err.value


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[agent]\nhost_id = '\xff'\n", "is not UTF-8 text (byte 19): save it as UTF-8"),
        (b"[agent]\nprobes = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests arrays or tables hundreds deep"),
        (b"# " + b"x" * (2 << 20) + b"\n", "is larger than 1 MiB"),
    ],
)
def test_a_file_that_is_no_configuration_is_refused_not_a_traceback(tmp_path, content, expected):
    f = tmp_path / "k.toml"
    f.write_bytes(content)
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert f"config file {f} {expected}" in str(err.value)


def test_values_that_mean_something_at_their_edges_still_load(tmp_path, monkeypatch):
    f = tmp_path / "k.toml"
    f.write_text(
        "[kafka]\nprefix = ''\nraw_retention_hours = 168\nreplication_factor = 'auto'\n"
        "[agent]\nmetrics_port = 0\nsample_every = {file_created = 10}\nheartbeat_seconds = 1\n"
        f"state_dir = '{tmp_path / 'not-yet'}'\ncgroup_root = '{tmp_path}'\n"
        "redact = [{kind = 'file_created', field = 'path', pattern = '^/home/[^/]+', replacement = ''}]\n"
        "[sample]\nbudget_per_s = {file_created = 5000}\n"
        f"[enrich]\nmetadata_file = '{tmp_path / 'written-later.jsonl'}'\n"
    )
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_OTLP__INSECURE", "true")  # the environment gives every value as text
    monkeypatch.setenv("KTEL_AGGREGATE__WINDOW_SECONDS", "2")
    monkeypatch.setenv("KTEL_OTLP__BEARER_TOKEN_FILE", "null")
    cfg = config.load(f)
    assert (cfg.kafka.prefix, cfg.agent.redact[0].replacement, cfg.otlp.insecure) == ("", "", True)
    assert cfg.aggregate.window_seconds == 2 and cfg.sample.budget_per_s == {"file_created": 5000}


def test_durations_at_their_ceiling_still_load_and_work(tmp_path, monkeypatch):
    from processors import enrich_core
    from processors.stages import next_window

    f = tmp_path / "k.toml"
    f.write_text(
        "[agent]\nheartbeat_seconds = 3600\n[sample]\nwindow_seconds = 3600\n"
        "[enrich]\nexit_grace_seconds = 3600\n"
    )
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    cfg = config.load(f)
    assert (cfg.agent.heartbeat_seconds, cfg.sample.window_seconds, cfg.enrich.exit_grace_seconds) == (
        3600,
    ) * 3
    now_ms = 1_764_000_000_000
    # (as the worker closes the sample stage's windows, and the enrich stage ends exits)
    assert next_window(now_ms, round(cfg.sample.window_seconds * 1000)) - now_ms <= 3_600_000
    state = {"exits": [["b", "1", 0]], "boots": {}}
    opts = enrich_core.Options.from_config(cfg.enrich)
    assert enrich_core._expire_exits(state, 3601 * 10**9, opts, enrich_core.Touched())


# The sample stage's commands must be within the agents' bounds, or every agent refuses
# them and adaptive sampling silently never applies: checked where the sample stage starts,
# with the agents' settings of the same file (one ktel.toml serves both in the chart).
@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[sample]\ncommand_ttl_seconds = 7200\n",
            "sample.command_ttl_seconds (7200) is above agent.control_max_ttl_seconds (3600), the longest "
            "command an agent takes: the agents would refuse every command of the sample stage; lower "
            "sample.command_ttl_seconds to at most 3600, or raise agent.control_max_ttl_seconds",
        ),
        # The agents' defaults count: they are what an agent reading this file holds to.
        (
            "[agent]\ncontrol_max_ttl_seconds = 60\n",
            "sample.command_ttl_seconds (300) is above agent.control_max_ttl_seconds (60)",
        ),
        (
            "[sample]\nraised_sample_every = 2000000\n",
            "sample.raised_sample_every (2000000) is above agent.control_max_sample_every (1000000), the "
            "sparsest rate an agent takes: the agents would refuse every raise of the sample stage; lower "
            "sample.raised_sample_every to at most 1000000, or raise agent.control_max_sample_every",
        ),
        (
            "[agent]\ncontrol_max_sample_every = 5\n[sample]\nnormal_sample_every = 10\n",
            "sample.normal_sample_every (10) is above agent.control_max_sample_every (5), the sparsest "
            "rate an agent takes: agents that predate restores would refuse every restore",
        ),
        (
            "[agent]\ncontrol_max_id_chars = 50\nprobes = ['syscall_latency', 'file_created']\n",
            "agent.control_max_id_chars (50) is below the 53 characters of the ids the sample stage gives "
            "its commands to this agent (ktel-sample-restore-<host id>-<probe>-<ms>, with a host id of 3 "
            "characters and probe syscall_latency): the agent would refuse every one; raise "
            "agent.control_max_id_chars to at least 53",
        ),
        # A command of a fraction of a ms goes out as 0 ms, which an agent refuses.
        ("[sample]\ncommand_ttl_seconds = 0.0004\n", "sample.command_ttl_seconds = 0.0004: Input should be"),
    ],
)
def test_a_sample_stage_the_agents_would_refuse_is_refused_naming_both_settings(
    tmp_path, monkeypatch, toml, expected
):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    f = tmp_path / "k.toml"
    f.write_text(toml)
    with pytest.raises(config.ConfigError) as err:
        config.check_sample_commands(config.load(f))
    assert expected in str(err.value), err.value


def test_an_agent_whose_own_file_tightens_its_bounds_starts_and_a_sample_stage_on_it_does_not(
    tmp_path, monkeypatch, capsys
):
    """An agent may read a file of its own (deploy/ktel-agent.service): bounds tighter than
    the sample stage's defaults are no reason for it not to start. A sample stage started
    on that file is refused before it does anything, naming both settings."""
    from ktel import cli
    from processors import stages

    def reached(*_args):
        raise AssertionError("the sample stage went on to reach Kafka")

    monkeypatch.setattr(stages, "reachable", reached)
    f = tmp_path / "agent.toml"
    f.write_text("[agent]\ncontrol_max_ttl_seconds = 60\n")
    assert config.load(f).agent.control_max_ttl_seconds == 60
    for stage in ("sample", "all"):
        with pytest.raises(SystemExit) as stop:
            cli.main(["--config", str(f), "process", stage])
        assert stop.value.code == 2
        assert (
            "sample.command_ttl_seconds (300) is above agent.control_max_ttl_seconds (60)"
            in capsys.readouterr().err
        )


def _sample_commands(cfg: config.Config, host_id: str, now: int = 1_764_000_000_000) -> list:
    """The commands the sample stage sends for a host that spikes and calms down, with
    ``cfg``'s sample section (a raise, then a restore)."""
    from processors.sample_core import Options, observe_host

    opts = Options.from_config(cfg.sample)
    state: dict = {}
    now -= 4 * int(opts.window_seconds * 1000)  # (the last window closes at ``now``)
    commands = []
    for rate in (100, 100, 100_000, 100):  # events a window: learns, spikes, calms down
        state["count"] = rate * opts.window_seconds
        commands += observe_host(state, host_id, cfg.agent.probes, now, opts)
        now += int(opts.window_seconds * 1000)
    assert [c.restore for c in commands] == [False] * len(cfg.agent.probes) + [True] * len(cfg.agent.probes)
    return commands


@pytest.mark.parametrize(
    ("toml", "one_past"),
    [
        (
            "[sample]\ncommand_ttl_seconds = 3600\n"
            "raised_sample_every = 1000000\nnormal_sample_every = 1000000\n",
            "KTEL_SAMPLE__COMMAND_TTL_SECONDS=3600.001",
        ),
        (
            "[agent]\ncontrol_max_ttl_seconds = 0.3005\n[sample]\ncommand_ttl_seconds = 0.3009\n",
            None,
        ),  # (whole ms)
        (
            "[agent]\ncontrol_max_sample_every = 10\n[sample]\nraised_sample_every = 10\n",
            "KTEL_SAMPLE__RAISED_SAMPLE_EVERY=11",
        ),
        # The longest id for host abc-0123456789 (14 characters) and probe file_created.
        ("[agent]\ncontrol_max_id_chars = 61\n", "KTEL_AGENT__CONTROL_MAX_ID_CHARS=60"),
    ],
)
def test_at_their_edges_the_agents_take_every_command_of_the_sample_stage(
    tmp_path, monkeypatch, toml, one_past
):
    """What the config lets through is what the agent applies: the check and the agent's
    bounds (edge_agent/control.py) agree, up to the last ms of a 13-digit time."""
    from edge_agent.control import Bounds, Control

    host = "abc-0123456789"
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", host)
    f = tmp_path / "k.toml"
    f.write_text(toml)
    cfg = config.load(f)
    agent = Control(host, {}, lambda *_: None, Bounds.of(cfg.agent), tmp_path)
    for c in _sample_commands(cfg, host, now=10**13 - 1):
        assert agent.refusal(c.id, c.probe, 1 if c.restore else c.sample_every, c.ttl_ms) is None, c
    if one_past is not None:
        monkeypatch.setenv(*one_past.split("="))
        with pytest.raises(config.ConfigError, match="the agents? would refuse"):
            config.check_sample_commands(config.load(f))


def test_an_agent_without_a_host_id_of_its_own_is_taken_as_named_by_its_machine_id(tmp_path, monkeypatch):
    """A processing worker reading the agents' file may have no /etc/machine-id (a
    container): the agents' own are 32 characters."""
    monkeypatch.setattr(config.AgentConfig.model_fields["host_id"], "default_factory", lambda: "")
    f = tmp_path / "k.toml"
    f.write_text("[agent]\ncontrol_max_id_chars = 78\n")
    with pytest.raises(config.ConfigError, match="a host id of 32 characters and probe file_created"):
        config.check_sample_commands(config.load(f))
    f.write_text("[agent]\ncontrol_max_id_chars = 79\n")
    config.check_sample_commands(config.load(f))


@pytest.mark.parametrize(
    ("protocol", "endpoint", "expected"),
    [
        # http/protobuf: an http(s) base URL, to which /v1/traces, ... are appended.
        (
            "http/protobuf",
            "collector:4318",
            "otlp.endpoint = 'collector:4318': Value error, has no http:// or https:// scheme, which "
            "http/protobuf needs: give a base URL such as http://collector:4318 (set it in the file or "
            "with KTEL_OTLP__ENDPOINT)",
        ),
        ("http/protobuf", "grpc://collector:4317", "has no http:// or https:// scheme"),
        ("http/protobuf", "http://collector:4318/v1/traces", "ends in a signal's path, and ktel appends"),
        ("http/protobuf", "http://collector:4318/v1/logs/", "give the base URL, e.g. http://collector:4318"),
        ("http/protobuf", "http://collector:4318?tenant=a", "has a ?query or #fragment, after which"),
        ("http/protobuf", "http://collector:4318 ", "has a space or control character in its host or port"),
        # grpc: a URL's host and port, or a gRPC address as it is.
        ("grpc", "http://user:pw@collector:4317", "has a user or password, which a gRPC address cannot"),
        ("grpc", "collector:4317/v1/traces", "is neither host:port nor a URL: give http://host:port"),
        ("grpc", "http:/collector:4317", "is neither host:port nor a URL"),
        ("grpc", " collector:4317", "has a space or control character"),
        # A gRPC address with an authority: the SDK connects to that authority and drops the rest.
        (
            "grpc",
            "dns://8.8.8.8/collector:4317",
            "otlp.endpoint = 'dns://8.8.8.8/collector:4317': Value error, has 8.8.8.8 after dns://, which "
            "the OTLP exporter would connect to instead of collector:4317 (it cannot be given a DNS server "
            "or another authority): give dns:///collector:4317",
        ),
        ("grpc", "xds://authority/collector", "give xds:///collector"),
        (
            "grpc",
            "unix://relative/path",
            "has a relative path after unix://, where gRPC takes only an absolute one: give "
            "unix:relative/path (relative), or unix:///relative/path (absolute)",
        ),
        ("grpc", "unix://otelcol.sock", "give unix:otelcol.sock (relative), or unix:///otelcol.sock"),
        (
            "grpc",
            "unix-abstract://otelcol",
            "has // after unix-abstract:, which makes the OTLP exporter take otelcol for a host: "
            "give unix-abstract:otelcol",
        ),
        # (neither protocol takes it)
        (None, "dns://8.8.8.8/collector:4317", "give dns:///collector:4317"),
        # Either, and so also with the protocol left to OTEL_EXPORTER_OTLP_PROTOCOL.
        (None, "http://:4317", "otlp.endpoint = 'http://:4317': Value error, has no host: give one"),
        (None, "http://collector:99999", "has a port that is not a number from 1 to 65535"),
        (None, "https://collector:http", "has a port that is not a number from 1 to 65535"),
        (None, "http://collector :4317", "has a space or control character in its host or port"),
        (None, "http://a:4317,http://b:4317", "names more than one address: give one endpoint"),
        (None, "http://[::1:4317", "is not a URL (Invalid IPv6 URL)"),
    ],
)
def test_an_otlp_endpoint_its_protocol_cannot_use_is_refused_with_the_form_to_give(
    tmp_path, monkeypatch, protocol, endpoint, expected
):
    """The SDK exporters take such an endpoint and fail at every export (retried for
    good): requests finds no connection adapter, gRPC cannot resolve the address."""
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_OTLP__ENDPOINT", endpoint)
    if protocol:
        monkeypatch.setenv("KTEL_OTLP__PROTOCOL", protocol)
    with pytest.raises(config.ConfigError) as err:
        config.load()
    assert expected in str(err.value), err.value


@pytest.mark.parametrize(
    ("protocol", "endpoint"),
    [
        ("grpc", "http://collector:4317"),
        ("grpc", "https://collector"),  # (port 443)
        ("grpc", "http://collector:4317/v1/traces"),  # (the path is not used)
        ("grpc", "collector:4317"),  # (TLS, unless otlp.insecure)
        ("grpc", "[::1]:4317"),
        ("grpc", "grpc://collector:4317"),
        ("grpc", "dns:///collector:4317"),
        ("grpc", "unix:///run/otelcol.sock"),
        ("grpc", "unix:run/otelcol.sock"),  # (relative)
        ("grpc", "dns:collector:4317"),
        ("grpc", "dns://collector:4317"),  # (the SDK connects to collector:4317)
        ("grpc", "ipv4:///10.0.0.5:4317"),
        ("grpc", "ipv6://[::1]:4317"),  # (to [::1]:4317)
        ("grpc", "unix-abstract:otelcol"),
        ("grpc", "http://collector:4317 "),
        ("http/protobuf", "http://collector:4318"),
        ("http/protobuf", "HTTPS://collector:4318/otlp/"),
        ("http/protobuf", "http://user:pw@collector:4318"),  # (requests sends basic auth)
        ("http/protobuf", " http://collector:4318"),
        # Unset, the exporter's OTEL_EXPORTER_OTLP_PROTOCOL decides: what either takes loads.
        (None, "collector:4317"),
        (None, "http://collector:4318/v1/traces"),
        (None, "http://user:pw@collector:4318"),
    ],
)
def test_every_otlp_endpoint_the_sdk_exporters_can_use_still_loads(monkeypatch, protocol, endpoint):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_OTLP__ENDPOINT", endpoint)
    if protocol:
        monkeypatch.setenv("KTEL_OTLP__PROTOCOL", protocol)
    assert config.load().otlp.endpoint == endpoint


@pytest.mark.parametrize(
    ("environment", "endpoint", "expected"),
    [
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "collector:4318",
            "otlp.endpoint = 'collector:4318' cannot be used over http/protobuf "
            "(OTEL_EXPORTER_OTLP_PROTOCOL, otlp.protocol unset): has no http:// or https:// scheme",
        ),
        (
            {},
            "http://user:pw@collector:4317",
            "cannot be used over grpc (the default, otlp.protocol and OTEL_EXPORTER_OTLP_PROTOCOL unset): "
            "has a user or password",
        ),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, None, "OTLP protocol 'http/json'"),
        (
            {"KTEL_OTLP__COMPRESSION": "deflate"},
            None,
            "otlp.compression = 'deflate' is not available over grpc",
        ),
    ],
)
def test_the_otlp_exporter_refuses_at_its_start_what_its_protocol_cannot_use(
    monkeypatch, environment, endpoint, expected
):
    """With otlp.protocol unset, the exporter's own OTEL_EXPORTER_OTLP_PROTOCOL decides,
    which another process loading the same file need not have: it loaded the config. A
    ConfigError, which `ktel export otlp` prints as it prints the config's own."""
    from exporters import otlp

    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    if endpoint is not None:
        monkeypatch.setenv("KTEL_OTLP__ENDPOINT", endpoint)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    cfg = config.load()  # every process loads it
    with pytest.raises(config.ConfigError) as err:
        otlp.make_exporters(cfg.otlp)  # the exporter's start
    assert expected in str(err.value), err.value


def test_deflate_over_grpc_is_refused_when_the_config_says_grpc(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text("[otlp]\nprotocol = 'grpc'\ncompression = 'deflate'\n")
    with pytest.raises(
        config.ConfigError, match="otlp.compression = 'deflate' is not available over grpc: use gzip"
    ):
        config.load(f)
    f.write_text("[otlp]\nprotocol = 'http/protobuf'\ncompression = 'deflate'\n")
    assert config.load(f).otlp.compression == "deflate"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "fe80::1%lo", "localhost", "pull.example"])
def test_a_pull_host_is_an_address_or_a_name(host):
    assert config.PullConfig(host=host).host == host


def _with_maps(tmp_path: Path, more: str) -> Path:
    """A config file whose [agent] and [remote_write] each set a map, and ``more``: what
    the environment's maps are given against."""
    f = tmp_path / "k.toml"
    f.write_text(
        "[agent]\nhost_id = 'h'\nsample_every = {ktel_api = 5}\n"
        "[remote_write]\nheaders = {X-Scope-OrgID = 'prod'}\n" + more
    )
    return f


def test_a_map_in_the_environment_replaces_the_files(tmp_path, monkeypatch):
    f = _with_maps(tmp_path, "[otlp]\nheaders = {authorization = 'Bearer prod'}\n")
    # As for any other value: merged into the file's, {} could take no header away.
    monkeypatch.setenv("KTEL_REMOTE_WRITE__HEADERS", "{}")
    monkeypatch.setenv("KTEL_AGENT__SAMPLE_EVERY", '{"file_created": 2}')
    # So too a map in a section given whole as JSON.
    monkeypatch.setenv("KTEL_OTLP", '{"headers": {"x-tenant": "dev"}}')
    cfg = config.load(f)
    assert cfg.remote_write.headers == {}
    assert cfg.agent.sample_every == {"file_created": 2}
    assert cfg.otlp.headers == {"x-tenant": "dev"}


def test_settings_and_map_keys_given_each_by_a_variable_merge_with_the_files(tmp_path, monkeypatch):
    f = _with_maps(tmp_path, "[kafka.principals]\noperator = 'User:ops'\n")
    monkeypatch.setenv("KTEL_AGENT__SAMPLE_EVERY__FILE_CREATED", "2")
    monkeypatch.setenv("KTEL_KAFKA__PRINCIPALS__AGENT", "User:edge")
    monkeypatch.setenv("KTEL_REMOTE_WRITE__URL", "http://prom:9090/api/v1/write")
    cfg = config.load(f)
    assert cfg.agent.sample_every == {"ktel_api": 5, "file_created": 2}
    assert (cfg.kafka.principals.operator, cfg.kafka.principals.agent) == ("User:ops", "User:edge")
    assert cfg.remote_write.headers == {"X-Scope-OrgID": "prod"}


@pytest.mark.parametrize(
    "toml",
    [
        "[agent]\nspool_max_mb = 1\n",  # zstd: spooled compressed
        "[agent]\ncompression = 'gzip'\nspool_max_mb = 2\n",
        "[agent]\ncompression = 'none'\nspool_max_mb = 1\nbatch_max_bytes = 1048448\n",
    ],
)
def test_a_spool_that_holds_a_whole_batch_is_accepted(tmp_path, toml, monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    f = tmp_path / "k.toml"
    f.write_text(toml)
    config.load(f)


def test_an_empty_config_file_name_is_refused_not_taken_for_none(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_CONFIG", "")
    with pytest.raises(config.ConfigError, match="KTEL_CONFIG is set but empty: name the TOML config file"):
        config.load()
    monkeypatch.delenv("KTEL_CONFIG")
    with pytest.raises(config.ConfigError, match=r"the config file given \(--config\) is empty"):
        config.load("")
    config.load()  # unset: the defaults and the KTEL_* variables


def test_a_host_ttl_of_a_second_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_AGGREGATE__HOST_TTL_SECONDS", "1")
    assert config.load().aggregate.host_ttl_seconds == config.MIN_HOST_TTL_SECONDS == 1
