#!/usr/bin/env bash
# A private dockerd in a network namespace of its own, for humans and for
# the demo: nothing on the host's own interfaces, rules or daemons changes.
#
#   test/dockerd.sh start NAME [dockerd flags...]  netns NAME, dockerd in it, test images
#   test/dockerd.sh stop NAME                       stop what start started (by pid), delete netns
#   test/dockerd.sh env NAME                        print DOCKER_HOST and an nsenter prefix
#
# State lives in /tmp/berth-NAME. Default dockerd flags:
# --userland-proxy=false --iptables=false (berth owns forwarding).
set -euo pipefail

cmd=${1:-}; name=${2:-berth-dev}
dir=/tmp/berth-$name
ns=/run/netns/$name
root=$(cd "$(dirname "$0")/.." && pwd)

in_ns() { nsenter --net="$ns" -- "$@"; }

start() {
	shift 2 || true
	[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }
	bash "$root/test/deps.sh"
	if [ -e "$ns" ]; then echo "netns $name exists; run: $0 stop $name" >&2; exit 1; fi
	mkdir -p "$dir"
	ip netns add "$name"
	ip -n "$name" link set lo up
	local flags=("$@")
	[ ${#flags[@]} -gt 0 ] || flags=(--userland-proxy=false --iptables=false)
	# nsenter, not `ip netns exec`: the latter remounts /sys and dockerd
	# then fails with "Devices cgroup isn't mounted".
	nsenter --net="$ns" -- setsid dockerd --data-root "$dir/data" --exec-root "$dir/exec" \
		--host "unix://$dir/docker.sock" --pidfile "$dir/docker.pid" --log-level warn \
		"${flags[@]}" >"$dir/dockerd.log" 2>&1 &
	for _ in $(seq 150); do
		DOCKER_HOST=unix://$dir/docker.sock docker version >/dev/null 2>&1 && break
		sleep 0.2
	done
	DOCKER_HOST=unix://$dir/docker.sock docker version --format 'dockerd {{.Server.Version}} (API {{.Server.APIVersion}}) up in netns '"$name" \
		|| { echo "dockerd did not start; log:" >&2; tail -20 "$dir/dockerd.log" >&2; exit 1; }
	images
}

images() {
	local img=$dir/image
	mkdir -p "$img/bin"
	cp /bin/busybox "$img/bin/busybox"
	for a in sh sleep cat echo nc httpd ls ip true false; do ln -sf busybox "$img/bin/$a"; done
	tar -C "$img" -cf "$dir/busybox.tar" .
	(cd "$root" && CGO_ENABLED=0 go build -o "$img/echoserver" ./test/echoserver)
	tar -C "$img" -cf "$dir/echo.tar" .
	export DOCKER_HOST=unix://$dir/docker.sock
	docker import "$dir/busybox.tar" berth-test/busybox:1 >/dev/null
	docker import --change 'ENTRYPOINT ["/echoserver"]' "$dir/echo.tar" berth-test/echo:1 >/dev/null
	echo "images: berth-test/busybox:1 berth-test/echo:1"
}

stop() {
	export DOCKER_HOST=unix://$dir/docker.sock
	if [ -S "$dir/docker.sock" ]; then
		ids=$(docker ps -aq 2>/dev/null || true)
		[ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
	fi
	if [ -f "$dir/docker.pid" ]; then
		pid=$(cat "$dir/docker.pid")
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid"
			for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
			kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
		fi
	fi
	grep " $dir/" /proc/self/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
	[ -e "$ns" ] && ip netns del "$name" || true
	rm -rf "$dir"
}

case "$cmd" in
start) start "$@" ;;
stop) stop ;;
images) images ;;
env) echo "export DOCKER_HOST=unix://$dir/docker.sock"; echo "# run commands inside: nsenter --net=$ns -- CMD" ;;
*) echo "usage: $0 start|stop|env NAME [dockerd flags]" >&2; exit 2 ;;
esac
