"""Which libc the agent's uprobes (dns_latency) attach to: a uprobe is on a file, and
sees only the processes that map that very file, so in a container the agent's own
libc is the image's, not the host's."""

from pathlib import Path

import pytest

from edge_agent import probes

IMAGE_LIBC = b"/usr/lib/x86_64-linux-gnu/libc.so.6"


def found(name: bytes) -> bytes | None:
    """BCC's find_library, as the image's ldconfig cache answers."""
    return IMAGE_LIBC if name == b"c" else None


def test_the_libc_given_is_the_one_attached(tmp_path):
    libc = tmp_path / "host" / "libc.so.6"
    libc.parent.mkdir()
    libc.write_bytes(b"\x7fELF")
    assert probes.uprobe_library("c", libc, found) == bytes(libc)


def test_without_a_libc_given_ldconfigs_is_attached():
    assert probes.uprobe_library("c", None, found) == IMAGE_LIBC


def test_a_libc_given_that_is_not_there_skips_the_probe_naming_the_setting(tmp_path):
    """Not the image's in its place: a probe on it would see none of the host's processes."""
    with pytest.raises(probes.ProbeUnavailable, match=r"agent.libc_path = '.*/missing' is not a file here"):
        probes.uprobe_library("c", tmp_path / "missing", found)


def test_a_library_ldconfig_does_not_know_skips_the_probe():
    with pytest.raises(probes.ProbeUnavailable, match="library 'nope' not found"):
        probes.uprobe_library("nope", None, found)


@pytest.fixture
def in_a_container(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")


@pytest.fixture
def on_the_host(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(probes, "CONTAINER_MARKERS", (Path("/nonexistent/.dockerenv"),))


def test_a_kubernetes_pod_or_a_marked_container_is_a_container(on_the_host, monkeypatch, tmp_path):
    assert not probes.in_container()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert probes.in_container()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    (tmp_path / ".dockerenv").touch()
    monkeypatch.setattr(probes, "CONTAINER_MARKERS", (tmp_path / ".dockerenv",))
    assert probes.in_container()


def test_in_a_container_a_probe_on_its_own_libc_is_warned_of(in_a_container):
    warning = probes.own_libc_warning(["file_created", "dns_latency"], None)
    assert warning is not None
    assert warning.startswith("dns_latency: the agent runs in a container and agent.libc_path is unset")
    assert "agent.libcHostPath" in warning


def test_no_warning_with_a_libc_given_without_a_probe_on_libc_or_on_the_host(in_a_container, monkeypatch):
    assert probes.own_libc_warning(["dns_latency"], Path("/host/libc/libc.so.6")) is None
    assert probes.own_libc_warning(["file_created", "tcp_retransmit"], None) is None
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.setattr(probes, "CONTAINER_MARKERS", (Path("/nonexistent/.dockerenv"),))
    assert probes.own_libc_warning(["dns_latency"], None) is None
