package nat

import (
	"os"
	"testing"

	"github.com/berth-dev/berth/test/netns"
)

func TestMain(m *testing.M) { os.Exit(netns.Run(m)) }
