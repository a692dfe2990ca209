#!/usr/bin/env bash
# Relay CPU cost per operation against docker-proxy, on loopback inside a
# network namespace of its own (a development tool; `make bench` is the
# report). Each forwarder is one process, so its CPU time per operation
# (utime+stime from /proc, in µs) is measured apart from the client's and
# the echo server's.
#
#   bash test/relayperf/run.sh            # conn, udp and bulk, twice
#   MODES=udp REPS=3 bash test/relayperf/run.sh
#   GMP=1 bash test/relayperf/run.sh      # relay with GOMAXPROCS=1
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dp=$(command -v docker-proxy || echo /usr/sbin/docker-proxy)
[ -x "$dp" ] || { echo "docker-proxy not found (apt-get install docker.io)" >&2; exit 1; }
bin=$(mktemp -d /tmp/relayperf.XXXXXX)
ns=relayperf-$$
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$bin"
}
trap cleanup EXIT
(cd "$root" && CGO_ENABLED=0 go build -o "$bin/" ./test/relayperf ./test/echoserver)
ip netns add "$ns"
ip -n "$ns" link set lo up
X="ip netns exec $ns"
$X sysctl -qw net.ipv4.tcp_tw_reuse=1
start() { "$@" & pids+=($!); }
start $X "$bin/echoserver" -tcp 80 -udp 53
start $X env GOMAXPROCS="${GMP:-$(nproc)}" "$bin/relayperf" fwd -proto tcp -listen 127.0.0.1:1080 -target 127.0.0.1:80
rt=$!
start $X env GOMAXPROCS="${GMP:-$(nproc)}" "$bin/relayperf" fwd -proto udp -listen 127.0.0.1:1053 -target 127.0.0.1:53
ru=$!
# docker-proxy writes its start-up status to fd 3 and closes it.
start $X "$dp" -proto tcp -host-ip 127.0.0.1 -host-port 2080 -container-ip 127.0.0.1 -container-port 80 3>/dev/null
dt=$!
start $X "$dp" -proto udp -host-ip 127.0.0.1 -host-port 2053 -container-ip 127.0.0.1 -container-port 53 3>/dev/null
du=$!
sleep 0.5
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; } # clock ticks
hz=$(getconf CLK_TCK)
run() { # name pid mode addr
	local a=0 b=0 out n per=-
	[ "$2" != 0 ] && a=$(cpu "$2")
	out=$($X "$bin/relayperf" load -mode "$3" -addr "$4" -d "${DUR:-3s}")
	[ "$2" != 0 ] && b=$(cpu "$2")
	n=$(echo "$out" | awk '{print $4}')
	if [ "$2" != 0 ]; then
		if [ "$3" = bulk ]; then
			per=$(awk -v t=$((b - a)) -v n="$n" -v hz="$hz" 'BEGIN{printf "%.0f µs/MiB", t*1e6/hz/(n/1048576)}')
		else
			per=$(awk -v t=$((b - a)) -v n="$n" -v hz="$hz" 'BEGIN{printf "%.1f µs/op", t*1e6/hz/n}')
		fi
	fi
	printf "%-5s %-13s %s  forwarder CPU %s\n" "$3" "$1" "$out" "$per"
}
for _ in $(seq "${REPS:-2}"); do
	for m in ${MODES:-conn udp bulk}; do
		case $m in
		conn | bulk) run direct 0 "$m" 127.0.0.1:80; run docker-proxy "$dt" "$m" 127.0.0.1:2080; run relay "$rt" "$m" 127.0.0.1:1080 ;;
		udp) run direct 0 "$m" 127.0.0.1:53; run docker-proxy "$du" "$m" 127.0.0.1:2053; run relay "$ru" "$m" 127.0.0.1:1053 ;;
		esac
	done
done
