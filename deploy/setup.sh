#!/usr/bin/env bash
# Sets up what ktel needs on this host, from scratch, and is quick when it is
# already done. Needs root.
#
#   deploy/setup.sh run   what `make run` needs: Debian packages (BCC, kernel headers,
#                         Prometheus, Java, Maven), kernel headers linked where BCC looks
#                         for them, tracefs, the Python environment (.venv, with access to
#                         Debian's BCC), Kafka's jars from Maven Central and the
#                         OpenTelemetry Collector built from the Go module proxy (both
#                         cached in ~/.cache/ktel, or $KTEL_CACHE_DIR)
#   deploy/setup.sh       all of that, and what the tests need besides: the dev Python
#                         packages, clang/libbpf, qemu, busybox and Debian's kernel image
#                         (the kernel-module VM test), systemd's systemd-analyze (the
#                         agent unit's test) and helm (the chart's tests)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'ktel setup: %s\n' "$*"; }

case "${1:-all}" in
  run) TESTS=0 ;;
  all) TESTS=1 ;;
  *) echo "usage: deploy/setup.sh [run]  (no argument: also what the tests need)" >&2; exit 2 ;;
esac
CACHE=${KTEL_CACHE_DIR:-$HOME/.cache/ktel}

if [ "$(id -u)" -ne 0 ]; then
  echo "ktel setup: run as root (BCC loads BPF programs and installs packages)" >&2
  exit 1
fi

# --- Debian packages --------------------------------------------------------
# gcc, libc6-dev and python3-dev build the agent's packer (setup.py) when ktel installs.
PKGS=(python3-bpfcc python3-venv python3-dev gcc libc6-dev linux-headers-amd64 prometheus openjdk-17-jre-headless maven openssl make)
if [ "$TESTS" = 1 ]; then
  PKGS+=(qemu-system-x86 busybox-static libc6-dev clang clang-format libbpf-dev libelf-dev zlib1g-dev libzstd-dev systemd)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- kernel headers for BCC -------------------------------------------------
# BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel
# has no headers package (a custom kernel), link Debian's newest; probes only
# read tracepoint fields, whose layout BCC takes from the running kernel.
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/Makefile" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "ktel setup: no /usr/src/linux-headers-*-amd64 found" >&2; exit 1; }
  common=${hdr%-amd64}-common
  log "linking kernel headers $hdr for $kver"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
fi

# --- tracefs ----------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ]; then
  log "mounting tracefs"
  mount -t tracefs nodev /sys/kernel/tracing
fi

# --- kernel image for the kernel-module VM test (tests/vm) -------------------
# tests/vm boots, in qemu, the Debian kernel that matches the newest headers
# (the ones kmod/ is built against): package linux-image-<ver>, whose name
# depends on the headers' ABI version, hence not in PKGS.
kmod_hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
if [ "$TESTS" = 1 ] && [ -n "$kmod_hdr" ]; then
  kmod_img=linux-image-${kmod_hdr#/usr/src/linux-headers-}
  if ! dpkg-query -W -f='${Status}' "$kmod_img" 2>/dev/null | grep -q "install ok installed"; then
    log "installing $kmod_img (the kernel tests/vm boots in qemu)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$kmod_img"
  fi
fi

# --- Python environment -----------------------------------------------------
PY=${KTEL_PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi
# ktel itself for running; with its dev extras (test and lint tools) for the tests.
# A stamp newer than pyproject.toml, setup.py and the compiled packer's sources says that
# set is installed (the dev one covers both); the editable install builds the packer in place.
if [ "$TESTS" = 1 ]; then
  spec='.[dev]' stamps=(.venv/.ktel-installed-dev)
else
  spec='.' stamps=(.venv/.ktel-installed .venv/.ktel-installed-dev)
fi
fresh=0
for st in "${stamps[@]}"; do
  if [ -f "$st" ] && [ -z "$(find pyproject.toml setup.py ktel/probes/*.c bpf/file_created.h -newer "$st")" ]; then fresh=1; fi
done
if [ "$fresh" = 0 ]; then
  log "installing Python packages ($spec)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "$spec"
  touch "${stamps[0]}"
fi
# Debian's BCC is pure Python over libbcc; give the venv that one package only.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
.venv/bin/python -c 'import bcc' || { echo "ktel setup: BCC does not import in .venv" >&2; exit 1; }

# --- OpenTelemetry Collector (for `make run` and the OTLP tests) -------------
# Built once with the official builder from the Go module proxy, from
# deploy/otelcol/builder-config.yaml, into ~/.cache/ktel/otelcol-<version>-<manifest hash>
# (a few CPU minutes the first time; cached, so later runs return at once).
# Needs Go >= 1.26 (the Collector modules require it): `go` on PATH or
# /usr/local/go/bin/go if new enough (Debian 12's golang is not), else a Go toolchain
# fetched once from the Go module proxy into the cache (ktel/stack/gotoolchain.py).
# For `make run` with KTEL_STACK__COLLECTOR_BINARY naming a prebuilt Collector, nothing
# is built (the OTLP tests always run the one built here).
if [ "$TESTS" = 1 ] || [ -z "${KTEL_STACK__COLLECTOR_BINARY:-}" ]; then
  .venv/bin/python -c 'from ktel.stack.otelcol import ensure_collector; print("ktel setup: OpenTelemetry Collector at", ensure_collector())'
fi

# --- Kafka ------------------------------------------------------------------
.venv/bin/python -c 'from ktel.stack.kafka import ensure_kafka; print("ktel setup: Kafka jars in", ensure_kafka())'

# --- helm, for the chart's tests (tests/integration/test_helm_chart.py) -------
# Built once from the Go module proxy (about 80 s) into the cache, with the same Go as
# the Collector.
HELM_VERSION=3.22.0  # tests/integration/test_helm_chart.py names it too
helm_bin="$CACHE/helm-$HELM_VERSION/bin"
if [ "$TESTS" = 1 ] && [ ! -x "$helm_bin/helm" ]; then
  go=$(.venv/bin/python -c 'from ktel.stack.gotoolchain import find_go; print(find_go())')
  log "building helm $HELM_VERSION with $go"
  GOBIN="$helm_bin" GOTOOLCHAIN=local "$go" install "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
fi
log "ready"
