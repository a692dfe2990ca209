package e2e

import (
	"testing"
	"time"

	"github.com/berth-dev/berth/test/harness"
)

// SIGTERM ends berth promptly and cleanly (exit status 0).
func TestSigtermStopsPromptly(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	start := time.Now()
	b.Stop()
	took := time.Since(start)
	t.Logf("berth stopped %v after SIGTERM", took)
	if took > 5*time.Second {
		t.Fatalf("berth took %v to stop after SIGTERM", took)
	}
	if code := b.Cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit status %d after SIGTERM", code)
	}
}
