"""`make run` on a host without Go: a Go toolchain from the Go module proxy, or a
prebuilt Collector (stack.collector_binary) and nothing built at all.

Each test uses a cache of its own (KTEL_CACHE_DIR): the shared ~/.cache/ktel is only read.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ktel.retry import Permanent
from ktel.stack import gotoolchain
from ktel.stack.kafka import KAFKA_VERSION, ensure_kafka
from ktel.stack.otelcol import ensure_collector
from tests.conftest import need_bpf
from tests.integration.up_harness import ktel_up


@pytest.fixture(scope="module")
def go_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("go-cache")


def test_a_go_toolchain_is_fetched_from_the_module_proxy_once(go_cache, monkeypatch) -> None:
    go = gotoolchain.ensure_go(go_cache)
    assert go == go_cache / f"go-{gotoolchain.GO_VERSION}" / "bin" / "go"
    out = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    assert f"go{gotoolchain.GO_VERSION} linux/amd64" in out
    # The compiler it runs itself was made executable too.
    vet = subprocess.run([go, "tool", "-n", "compile"], capture_output=True, text=True, check=True).stdout
    assert os.access(vet.strip(), os.X_OK)
    # Cached: a second call needs no proxy (this one answers nothing).
    monkeypatch.setenv("GOPROXY", "http://127.0.0.1:1")
    assert gotoolchain.ensure_go(go_cache) == go


def test_a_toolchain_whose_bytes_differ_from_the_pinned_hash_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(gotoolchain, "ZIP_SHA256", "0" * 64)
    with pytest.raises(Permanent, match="not the pinned 0000"):
        gotoolchain.ensure_go(tmp_path)
    assert not (tmp_path / f"go-{gotoolchain.GO_VERSION}" / "bin" / "go").exists()


def test_without_a_usable_go_on_the_host_the_fetched_one_is_used(go_cache, tmp_path, monkeypatch) -> None:
    # On PATH only Debian 12's golang, too old for the Collector's modules.
    old = tmp_path / "bin" / "go"
    old.parent.mkdir()
    old.write_text("#!/bin/sh\necho go1.19.8\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{old.parent}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setattr(gotoolchain, "HOST_GO", [])  # no /usr/local/go either
    assert gotoolchain.find_go(go_cache) == str(gotoolchain.ensure_go(go_cache))


def hidden_go_argv(argv: list[str]) -> list[str]:
    """``argv`` in a mount namespace where /usr/local/go is empty: no Go on this host."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /usr/local/go && exec "$@"', "sh", *argv]  # fmt: skip


def test_ktel_up_runs_a_prebuilt_collector_with_no_go_on_the_host(tmp_path) -> None:
    need_bpf()
    if not Path("/usr/local/go").is_dir():
        pytest.skip("/usr/local/go is absent: nothing to hide (the test hides it with a tmpfs)")
    # A prebuilt Collector: the one the shared cache holds (deploy/setup.sh built it).
    prebuilt = ensure_collector()
    cache = tmp_path / "cache"
    cache.mkdir()
    # Kafka's jars as a prebuilt too (Maven is not what this test is about).
    (cache / f"kafka-{KAFKA_VERSION}").symlink_to(ensure_kafka().parent)
    no_go_path = os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "go").exists()
    )
    env = dict(
        PATH=no_go_path,
        KTEL_CACHE_DIR=str(cache),
        KTEL_STACK__COLLECTOR_BINARY=str(prebuilt),
    )
    # The check the test stands on: in that namespace, there is no Go to run.
    look = hidden_go_argv(["sh", "-c", "ls -A /usr/local/go; command -v go || echo no-go"])
    assert (
        subprocess.run(look, env=dict(os.environ, **env), capture_output=True, text=True).stdout == "no-go\n"
    )
    with ktel_up(tmp_path, wrap=hidden_go_argv, **env) as (proc, _ports, lines, _env):
        out = "".join(lines)
        assert f"using the OpenTelemetry Collector at {prebuilt}" in out
        assert "Everything is ready" in (tmp_path / "stack" / "otelcol" / "otelcol.log").read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    assert proc.returncode == 0, "".join(lines[-30:])
    # Nothing was built or fetched for the Collector.
    assert sorted(p.name for p in cache.iterdir()) == [f"kafka-{KAFKA_VERSION}"]
