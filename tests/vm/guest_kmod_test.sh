#!/bin/sh
# Runs inside the qemu guest (busybox sh) as /test.sh; tests/vm/test_kmod_vm.py judges its output.
#
# It only acts and reports: every step prints "KTEL RC <step> <exit code>",
# every dump sits between "=====KTEL BEGIN <name>=====" and
# "=====KTEL END <name>=====", and the host decides what passes. /test.env
# sets N (operations fired and files created) and RELOADS.

. /test.env
T=/sys/kernel/tracing
M=/lib/ktel
DBG=/sys/kernel/debug
W=/tmp/fw

. /lib/ktel/guest_lib.sh
load_all() { insmod $M/ktel.ko && insmod $M/ktel_sample.ko && insmod $M/filewatcher.ko; }
unload_all() { rmmod filewatcher && rmmod ktel_sample && rmmod ktel; }

stamp start
echo "ktel-vm-test: start" >/dev/kmsg

# --- load, and the events' format files --------------------------------------
step insmod_ktel insmod $M/ktel.ko
step insmod_ktel_sample insmod $M/ktel_sample.ko
step insmod_filewatcher insmod $M/filewatcher.ko
dump modules /proc/modules
for f in $T/events/ktel/*/format $T/events/filewatcher/*/format; do
	ev=${f#"$T"/events/}
	dump "format ${ev%/format}" "$f"
done

# --- workload with the events enabled -----------------------------------------
# Files that exist before tracing starts; reopening them must not count.
mkdir -p $W/existing $W/created
for i in 1 2 3 4 5; do echo seed >$W/existing/e$i; done

echo >$T/trace
step enable_ktel sh -c "echo 1 >$T/events/ktel/enable"
step enable_filewatcher sh -c "echo 1 >$T/events/filewatcher/enable"
stamp workload

step fire sh -c "echo $N >$DBG/ktel_sample/fire"

# N new files, created by every kind of open that can create one.
failed=0
i=1
while [ $i -le "$N" ]; do
	f=$W/created/file-$i
	case $((i % 6)) in
	0) : >"$f" ;;
	1) /bin/guest_open excl "$f" ok ;;
	2) /bin/guest_open creat "$f" ok ;;
	3) /bin/guest_open rdcreat "$f" ok ;;
	4) /bin/guest_open creat2 "$f" ok ;;
	5) /bin/guest_open append "$f" ok ;;
	esac || failed=$((failed + 1))
	i=$((i + 1))
done
rc create_files $failed

# Existing files, opened with and without O_CREAT: none of this creates a file.
failed=0
for f in $W/existing/*; do
	cat "$f" >/dev/null || failed=$((failed + 1))
	echo more >>"$f" || failed=$((failed + 1))
	: >"$f" || failed=$((failed + 1))
	for m in plain trunc append creat rdcreat creat2; do
		/bin/guest_open $m "$f" ok || failed=$((failed + 1))
	done
	/bin/guest_open excl "$f" EEXIST || failed=$((failed + 1))
done
# O_CREAT in a directory that does not exist fails: nothing created either.
/bin/guest_open creat $W/no-such-dir/x ENOENT || failed=$((failed + 1))
rc open_existing $failed

step disable_filewatcher sh -c "echo 0 >$T/events/filewatcher/enable"
step disable_ktel sh -c "echo 0 >$T/events/ktel/enable"
stamp workload_done
dump trace $T/trace
dump filewatcher_missed $DBG/filewatcher/missed

# --- disabled events emit nothing ----------------------------------------------
echo >$T/trace
step fire_disabled sh -c "echo 7 >$DBG/ktel_sample/fire"
step create_disabled sh -c ": >$W/created/disabled-1 && : >$W/created/disabled-2"
dump trace_disabled $T/trace

# --- the longest names, keys and values, in buffers with no NUL -------------------
echo >$T/trace
step enable_longest sh -c "echo 1 >$T/events/ktel/ktel_counter/enable"
step fire_longest sh -c "echo $N >$DBG/ktel_sample/fire_longest"
step disable_longest sh -c "echo 0 >$T/events/ktel/ktel_counter/enable"
dump trace_longest $T/trace
dump longest_overreads $DBG/ktel_sample/longest_overreads

# --- span attributes given to begin, to end, to both ------------------------------
echo >$T/trace
step enable_span_attrs sh -c "echo 1 >$T/events/ktel/ktel_span_begin/enable && echo 1 >$T/events/ktel/ktel_span_end/enable"
step fire_span_attrs sh -c "echo $N >$DBG/ktel_sample/fire_span_attrs"
step disable_span_attrs sh -c "echo 0 >$T/events/ktel/ktel_span_begin/enable && echo 0 >$T/events/ktel/ktel_span_end/enable"
dump trace_span_attrs $T/trace

# --- BPF programs on the same events (libbpf, ring buffer) --------------------
# ftrace's events are off now: the BPF programs alone switch the tracepoints on.
mkdir -p $W/bpf
/bin/ktel_bpf $M/ktel_events.bpf.o >/tmp/bpf.out 2>&1 &
bpf_pid=$!
n=0
while ! grep -q "KTEL BPF READY" /tmp/bpf.out && kill -0 $bpf_pid 2>/dev/null && [ $n -lt 600 ]; do
	usleep 100000
	n=$((n + 1))
done
stamp bpf
step bpf_fire sh -c "echo $N >$DBG/ktel_sample/fire"
failed=0
i=1
while [ $i -le "$N" ]; do
	: >$W/bpf/file-$i || failed=$((failed + 1))
	i=$((i + 1))
done
# And one whose path is longer than the record's 255 bytes: kept as its start, marked.
L=$W/bpf/long/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
L=$L/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
L=$L/cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc
L=$L/dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd
{ mkdir -p $L && : >$L/long-file; } || failed=$((failed + 1))
rc bpf_create_files $failed
kill -INT $bpf_pid
wait $bpf_pid
rc bpf_loader $?
stamp bpf_done
dump bpf /tmp/bpf.out

# --- unload and reload, with the events enabled while the modules go ----------
stamp reloads
ok=0
i=1
while [ $i -le "$RELOADS" ]; do
	unload_all && load_all &&
		echo 1 >$T/events/ktel/enable && echo 1 >$T/events/filewatcher/enable &&
		echo 1 >$DBG/ktel_sample/fire && : >$W/reload-$i && ok=$((ok + 1))
	i=$((i + 1))
done
echo "KTEL RELOADS $ok $RELOADS"
stamp reloads_done
step final_unload unload_all
dump modules_after /proc/modules
begin leftovers
ls -d $T/events/ktel $T/events/filewatcher $DBG/ktel_sample $DBG/filewatcher 2>/dev/null
grep do_filp_open $DBG/kprobes/list
end leftovers

# --- kernel log ---------------------------------------------------------------
dump tainted /proc/sys/kernel/tainted
begin dmesg
dmesg -s 1048576 # busybox reads 16 KiB by default: the whole log, please
end dmesg
stamp done
