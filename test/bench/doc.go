// Package bench is `make bench`: berth side by side with docker-proxy,
// Docker's own NAT and a direct connection to the container, in one run on
// one machine, written to bench/out/report.md with a chart.
//
// The load generator and the report writer are ordinary files here; the
// run itself is a test behind the `bench` build tag, so `go test ./...`
// (and CI) never starts it:
//
//	bash test/bench.sh quick|full
//	BERTH_BENCH=quick go test -tags bench -run '^TestBench$' -v ./test/bench
package bench
