#!/usr/bin/env bash
# Sets up everything ktel needs on this host, from scratch, and is quick when
# it is already done: Debian packages (BCC, kernel headers, Prometheus, Java,
# Maven), kernel headers linked where BCC looks for them, tracefs, the Python
# environment (.venv, with access to Debian's BCC), and Kafka's jars from Maven
# Central (cached in ~/.cache/ktel). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'ktel setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "ktel setup: run as root (BCC loads BPF programs and installs packages)" >&2
  exit 1
fi

# --- Debian packages --------------------------------------------------------
PKGS=(python3-bpfcc linux-headers-amd64 prometheus openjdk-17-jre-headless maven openssl make qemu-system-x86 busybox-static libc6-dev clang clang-format libbpf-dev libelf-dev zlib1g-dev libzstd-dev)
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
if [ -n "$kmod_hdr" ]; then
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
stamp=.venv/.ktel-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing Python packages"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
# Debian's BCC is pure Python over libbcc; give the venv that one package only.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
.venv/bin/python -c 'import bcc' || { echo "ktel setup: BCC does not import in .venv" >&2; exit 1; }

# --- OpenTelemetry Collector (for `make run` and the OTLP tests) -------------
# Built once with the official builder from the Go module proxy, from
# deploy/otelcol/builder-config.yaml, into ~/.cache/ktel/otelcol-<version>
# (a few CPU minutes the first time; cached, so later runs return at once).
# Needs Go >= 1.26 (the Collector modules require it): /usr/local/go/bin/go or `go` on
# PATH; Debian 12's golang is too old.
.venv/bin/python -c 'from ktel.stack.otelcol import ensure_collector; print("ktel setup: OpenTelemetry Collector at", ensure_collector())'

# --- Kafka ------------------------------------------------------------------
.venv/bin/python -c 'from ktel.stack.kafka import ensure_kafka; print("ktel setup: Kafka jars in", ensure_kafka())'
log "ready"
