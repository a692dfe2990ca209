#!/usr/bin/env bash
# Builds the current Docker engine (moby v2, the Docker 29 line) from the Go
# module proxy into a cache outside the checkout, keyed by version, so a
# machine builds it once (about 5 minutes on 2 cores), not per run.
# Prints the directory holding dockerd and docker-proxy.
set -euo pipefail
version=${BERTH_MOBY_VERSION:-v2.0.0-beta.24}
cache=${BERTH_ENGINE_CACHE:-/var/cache/berth-engines}
dir=$cache/$version
if [ -x "$dir/dockerd" ] && [ -x "$dir/docker-proxy" ]; then
	echo "$dir"
	exit 0
fi
mkdir -p "$dir.tmp"
echo "building dockerd $version into $dir (once per machine)" >&2
GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS= go install \
	-tags 'netgo osusergo static_build exclude_graphdriver_btrfs exclude_graphdriver_devicemapper' \
	"github.com/moby/moby/v2/cmd/dockerd@$version" "github.com/moby/moby/v2/cmd/docker-proxy@$version" >&2
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir"
