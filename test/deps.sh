#!/usr/bin/env bash
# Installs the Debian packages berth's tests and demo need, when run as
# root; otherwise says exactly what is missing. Idempotent and quiet when
# everything is there.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have dockerd       || need+=(docker.io)
have iptables      || need+=(iptables)
[ -x /bin/busybox ] || need+=(busybox-static)
have conntrack     || need+=(conntrack)
have ip            || need+=(iproute2)
have nsenter       || need+=(util-linux)
have ss            || need+=(iproute2)
have docker-compose || need+=(docker-compose)
have systemd-analyze || need+=(systemd)
have setpriv       || need+=(util-linux)

if [ ${#need[@]} -eq 0 ]; then
	exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "missing Debian packages: ${need[*]}" >&2
	echo "install them as root: apt-get install -y ${need[*]}" >&2
	exit 1
fi
echo "installing: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's docker.io package may try to start the system dockerd; berth's
# tests use their own private one and never touch the system daemon.
