#!/usr/bin/env bash
# make bench / make bench-quick: berth against docker-proxy, Docker's NAT and
# a direct connection, in one run, inside network namespaces of its own
# (three private dockerds, never the host's). Writes bench/out/report.md and
# bench/out/chart.svg and prints the report; a full run also copies both
# to bench/ (the committed report).
#
#   bash test/bench.sh quick   # < 3 min: scale series up to 100 ports
#   bash test/bench.sh full    # < 20 min on 2 cores: up to 1,000 ports
set -euo pipefail
mode=${1:-quick}
case "$mode" in quick | full) ;; *) echo "usage: $0 quick|full" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/bench/out
mkdir -p "$out"
rm -f "$out/report.md" "$out/chart.svg"
cd "$root"
timeout=10m
[ "$mode" = full ] && timeout=30m
# CGO off as in the Makefile; the bench tag keeps this out of `go test ./...`.
set +e
BERTH_BENCH=$mode BERTH_BENCH_OUT=$out CGO_ENABLED=0 \
	go test -tags bench -count=1 -timeout "$timeout" -run '^TestBench$' -v ./test/bench 2>&1 |
	tee "$out/run.log" | grep --line-buffered -vE '^=== (RUN|PAUSE|CONT)'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ] || [ ! -s "$out/report.md" ]; then
	echo "bench failed (exit $status; log: $out/run.log)" >&2
	exit 1
fi
echo
cat "$out/report.md"
echo
echo "report: $out/report.md  chart: $out/chart.svg"
if [ "$mode" = full ]; then
	# The committed copy (bench/report.md, linked from the README) is the
	# last full run's.
	cp "$out/report.md" "$out/chart.svg" "$root/bench/"
	echo "copied to bench/report.md and bench/chart.svg"
fi
