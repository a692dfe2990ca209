#!/usr/bin/env bash
# make demo: a private dockerd (in a network namespace of its own), one
# container publishing 1,000 TCP ports, one berth process forwarding all of
# them, proved by real connections from a "remote host" namespace, from the
# host to 127.0.0.1 and to [::1], then everything torn down.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=berth-demo-$$
remote=$name-r
dir=/tmp/berth-$name
ns=/run/netns/$name
ports=${DEMO_PORTS:-20000-20999}
berth_pid=

cleanup() {
	set +e
	[ -n "$berth_pid" ] && kill -TERM "$berth_pid" 2>/dev/null && wait "$berth_pid" 2>/dev/null
	[ -e "$ns" ] && nsenter --net="$ns" -- "$root/bin/berth" reconcile --cleanup --docker-host "unix://$dir/docker.sock" >/dev/null 2>&1
	ip netns del "$remote" 2>/dev/null
	bash "$root/test/dockerd.sh" stop "$name"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
in_ns() { nsenter --net="$ns" -- "$@"; }
in_remote() { nsenter --net="/run/netns/$remote" -- "$@"; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

step "private dockerd in netns $name (--userland-proxy=false --iptables=false)"
bash "$root/test/dockerd.sh" start "$name"
export DOCKER_HOST=unix://$dir/docker.sock
echo=$dir/image/echoserver

step "a remote host: netns $remote joined by veth (10.250.0.2 -> 10.250.0.1)"
ip netns add "$remote"
ip link add bdemo0 netns "$name" type veth peer name bdemo1 netns "$remote"
in_ns ip addr add 10.250.0.1/24 dev bdemo0
in_ns ip link set bdemo0 up
in_remote ip addr add 10.250.0.2/24 dev bdemo1
in_remote ip link set bdemo1 up
in_remote ip link set lo up

step "berth run"
# nsenter execs berth, so $! is berth's own pid.
nsenter --net="$ns" -- "$root/bin/berth" run --docker-host "$DOCKER_HOST" --log-format text >"$dir/berth.log" 2>&1 &
berth_pid=$!
for _ in $(seq 100); do grep -q "first sync done" "$dir/berth.log" && break; sleep 0.1; done
head -4 "$dir/berth.log"

step "docker run -p $ports:$ports (1,000 ports, both families = 2,000 mappings)"
t0=$(date +%s%N)
docker run -d --name demo -e NAME=demo -p "$ports:$ports" berth-test/echo:1 -tcp "$ports" >/dev/null
echo "docker run returned after $(ms_since "$t0") ms"
want=$(( 2 * ($(echo "$ports" | cut -d- -f2) - $(echo "$ports" | cut -d- -f1) + 1) ))
for _ in $(seq 600); do
	n=$(in_ns "$root/bin/berth" status -o json 2>/dev/null | grep -c '"state": "installed"' || true)
	[ "$n" -ge "$want" ] && break
	sleep 0.05
done
echo "berth status: $n of $want mappings installed $(ms_since "$t0") ms after docker run"

step "real connections to every port"
in_remote "$echo" check -host 10.250.0.1 -tcp "$ports" -expect demo    # NAT, PREROUTING
in_ns "$echo" check -host 127.0.0.1 -tcp "$ports" -expect demo         # NAT, OUTPUT + route_localnet
in_ns "$echo" check -host ::1 -tcp "$ports" -expect demo               # relay, IPv6 to IPv4-only container

step "processes and memory"
dockerd_pid=$(cat "$dir/docker.pid")
proxies=$(pgrep -c -P "$dockerd_pid" -x docker-proxy || true)
rss=$(awk '/VmRSS/ {print $2, $3}' "/proc/$berth_pid/status")
echo "berth processes: 1 ($(cat /proc/$berth_pid/comm), pid $berth_pid), RSS $rss; docker-proxy processes of this dockerd: $proxies"
in_ns "$root/bin/berth" status | grep -E "^[0-9]+ mappings:"

step "docker rm -f demo"
t0=$(date +%s%N)
docker rm -f demo >/dev/null
echo "docker rm returned after $(ms_since "$t0") ms"
for _ in $(seq 200); do
	n=$(in_ns "$root/bin/berth" status -o json 2>/dev/null | grep -c '"host_port"' || true)
	[ "$n" -eq 0 ] && break
	sleep 0.05
done
echo "berth status: $n mappings left $(ms_since "$t0") ms after docker rm"
if in_remote "$echo" check -host 10.250.0.1 -tcp "${ports%%-*}" -timeout 1s >/dev/null; then
	echo "FAIL: a port still answers after the container is gone" >&2
	exit 1
fi
echo "ports no longer answer"
step "demo passed; tearing down"
