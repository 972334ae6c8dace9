#!/bin/sh
# Runs inside the qemu guest (busybox sh) as /test.sh of the agent VM;
# tests/vm/test_kmod_vm.py judges its output (the reporting of guest_lib.sh).
#
# The whole kernel side with the real agent. The guest has no Python or BCC of
# its own: the host's root is shared read-only over virtio-9p
# (tests/vm/qemu_harness.py) and the agent runs chrooted in it, from the
# repository's .venv, with Kafka unreachable, so every batch stays in its spool;
# a helper then prints the spool's events for the host to judge. /test.env sets
# N, NINEP_MODULES (the virtio-9p modules, in load order), REPO and PYTHON (the
# host's repository and its .venv's python).

. /test.env
. /lib/ktel/guest_lib.sh
M=/lib/ktel
DBG=/sys/kernel/debug
W=/tmp/fw

stamp start
step insmod_ktel insmod $M/ktel.ko
stamp agent
for m in $NINEP_MODULES; do insmod $M/$m.ko || echo "insmod $m failed"; done
H=/host
mkdir -p $H
step host_mount mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 hostroot $H
mount -t proc proc $H/proc
mount -t sysfs sysfs $H/sys
mount -t tracefs tracefs $H/sys/kernel/tracing
mount -t debugfs debugfs $H/sys/kernel/debug
mount -t devtmpfs devtmpfs $H/dev
# Writable space on /run, not /tmp: the repository itself may live under the host's /tmp.
mount -t tmpfs tmpfs $H/run
# exec all the way down: the backgrounded agent's $! is the agent itself, for kill -TERM.
in_host() {
	exec chroot $H /bin/sh -c "cd $REPO && exec env PYTHONDONTWRITEBYTECODE=1 KTEL_AGENT__HOST_ID=ktel-vm \
		TMPDIR=/run KTEL_AGENT__STATE_DIR=/run/ktel-agent KTEL_AGENT__METRICS_PORT=${METRICS_PORT:-0} KTEL_AGENT__PROBES='[\"ktel_api\", \"file_created\", \"module_load\"]' \
		KTEL_KAFKA__BOOTSTRAP=127.0.0.1:9 $PYTHON $*"
}
# Before filewatcher: file_created's syscall fallback on this kernel.
mkdir -p $H/run/fb
(in_host -m tests.vm.guest_fallback /run/fb >$H/run/fallback.jsonl 2>$H/run/fallback.err)
rc fallback $?
dump fallback $H/run/fallback.jsonl
dump fallback_err $H/run/fallback.err
step insmod_filewatcher insmod $M/filewatcher.ko
# Its /metrics on the guest's loopback, read before it stops.
ifconfig lo 127.0.0.1 up
METRICS_PORT=9465 in_host -m ktel.cli agent >$H/run/agent.log 2>&1 &
agent_pid=$!
n=0
while ! grep -q "agent host.id=" $H/run/agent.log && kill -0 $agent_pid 2>/dev/null && [ $n -lt 3000 ]; do
	usleep 100000
	n=$((n + 1))
done
stamp agent_ready
# Loaded with the agent running, for the module_load probe to see.
step insmod_ktel_sample insmod $M/ktel_sample.ko
mkdir -p $W/agent
step agent_fire sh -c "echo $N >$DBG/ktel_sample/fire"
step agent_fire_span_attrs sh -c "echo $N >$DBG/ktel_sample/fire_span_attrs"
failed=0
i=1
while [ $i -le "$N" ]; do
	: >$W/agent/file-$i || failed=$((failed + 1))
	i=$((i + 1))
done
rc agent_create_files $failed
# A file whose absolute path is longer than PATH_MAX, created relative to a deep cwd:
# filewatcher's d_path() fails on it. The creating shell (":" is its own builtin) then
# moves to / and lives on past the agent's read of the event, so a /proc/<pid>/cwd the
# agent resolved "(d_path failed)" against would be there to make up "/(d_path failed)".
D=$(head -c 250 /dev/zero | tr '\0' d) # 18 of these: 4518 bytes
(
	mkdir -p $W/deep && cd $W/deep || exit 1
	i=0
	while [ $i -lt 18 ]; do
		mkdir $D && cd -P $D || exit 1 # -P: chdir to $D itself, not to a path past PATH_MAX
		i=$((i + 1))
	done
	: >deep-file
	cd / && sleep 1
)
rc agent_create_deep $?
sleep 1 # more than the agent's 50 ms batch window, so the events are read before the stop
begin agent_metrics
wget -q -O - http://127.0.0.1:9465/metrics
end agent_metrics
kill -TERM $agent_pid
wait $agent_pid
rc agent $?
stamp agent_done
dump agent_log $H/run/agent.log
(in_host -m tests.vm.guest_dump_spool /run/ktel-agent/spool >$H/run/spool.jsonl 2>$H/run/spool.err)
rc spool_dump $?
dump agent_spool $H/run/spool.jsonl
dump spool_err $H/run/spool.err
for d in run dev sys/kernel/debug sys/kernel/tracing sys proc; do umount $H/$d; done
step host_umount umount $H

stamp done
