import pytest

from edge_agent.redact import Redactor
from ktel.config import ConfigError, RedactRule
from ktel.wire import FILE_CREATED


def ev(path):
    return [FILE_CREATED.id, 1, 2, 2, 0, "vim", path, 0o101, False]


def test_rules_mask_before_sealing():
    r = Redactor(
        [
            RedactRule(kind="file_created", field="path", pattern=r"^/home/[^/]+", replacement="/home/*"),
            RedactRule(kind="file_created", field="path", pattern=r"secret[^/]*"),
        ]
    )
    events = [ev("/home/alice/notes.txt"), ev("/etc/secret.key"), ev("/tmp/plain")]
    r.apply(events)
    assert [e[6] for e in events] == ["/home/*/notes.txt", "/etc/***", "/tmp/plain"]
    assert events[0][5] == "vim"  # other fields untouched


def test_no_rules_is_falsy_so_the_agent_skips_the_loop():
    assert not Redactor([])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            RedactRule(kind="nope", field="path", pattern="x"),
            "agent.redact[0].kind = 'nope': unknown event kind",
        ),
        (RedactRule(kind="file_created", field="cwd", pattern="x"), "agent.redact[0].field = 'cwd'"),
    ],
)
def test_bad_rules_name_the_field(rule, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Redactor([rule])


def test_bad_pattern_is_a_config_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RedactRule(kind="file_created", field="path", pattern="(")
