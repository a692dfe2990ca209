package main

import (
	"context"
	"errors"

	"github.com/berth-dev/berth/watcher"
)

// newNAT builds the NAT table; replaced when forward/nat lands.
func (b *backendFlags) newNAT() (natBackend, []string, error) {
	return nil, nil, errors.New("not built")
}

func (b *backendFlags) beforeSync(nat natBackend) func(context.Context, []watcher.Bridge) error {
	return nil
}
