#!/bin/sh
# Shared by the guest scripts of tests/vm (sourced): how they report to the host.
# Every step prints "KTEL RC <step> <exit code>", every dump sits between
# "=====KTEL BEGIN <name>=====" and "=====KTEL END <name>=====".
begin() { echo "=====KTEL BEGIN $1====="; }
end() { echo "=====KTEL END $1====="; }
rc() { echo "KTEL RC $1 $2"; }
step() {
	name=$1
	shift
	"$@"
	rc "$name" $?
}
stamp() { echo "KTEL TIME $1 $(cut -d' ' -f1 /proc/uptime)"; }
dump() {
	begin "$1"
	cat "$2"
	end "$1"
}
