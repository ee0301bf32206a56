#!/usr/bin/env bash
# Builds Jaeger v2 (github.com/jaegertracing/jaeger/cmd/jaeger) from source with the installed Go
# toolchain into build/jaeger/, once: a later run with the binary present does nothing.
set -euo pipefail
VERSION=${JAEGER_VERSION:-v1.76.0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/build/jaeger
BIN=$OUT/jaeger-$VERSION
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
[ -x "$GO" ] || { echo "Go is needed to build Jaeger (https://go.dev/dl/)" >&2; exit 1; }
mkdir -p "$OUT/src"
cd "$OUT/src"
# A throwaway module that requires Jaeger as a tool: `go install pkg@version` refuses modules
# whose go.mod has replace directives, `go get -tool` in a module of our own does not.
[ -f go.mod ] || "$GO" mod init sluice.local/jaeger-build >/dev/null 2>&1
"$GO" get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$VERSION" >&2
CGO_ENABLED=0 "$GO" build -trimpath -ldflags='-s -w' -o "$BIN.tmp" github.com/jaegertracing/jaeger/cmd/jaeger >&2
mv "$BIN.tmp" "$BIN"
echo "$BIN"
