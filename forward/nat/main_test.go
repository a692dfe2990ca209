package nat

import (
	"os"
	"strings"
	"testing"

	"github.com/berth-dev/berth/test/netns"
)

// TestMain runs the tests in a network namespace of their own. Fuzzing runs
// in place instead (the fuzz target is pure; kernel tests skip outside the
// namespace). Under `go test -fuzz` the worker stalls after a few execs
// here (not yet understood); the compiled binary fuzzes fine:
//
//	go test -c -o /tmp/nat.test ./forward/nat && cd forward/nat &&
//	/tmp/nat.test -test.run '^$' -test.fuzz FuzzParseSave -test.fuzztime 30s
func TestMain(m *testing.M) {
	for _, a := range os.Args[1:] {
		if strings.HasPrefix(a, "-test.fuzz") {
			os.Exit(m.Run())
		}
	}
	os.Exit(netns.Run(m))
}
