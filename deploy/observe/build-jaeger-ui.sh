#!/usr/bin/env bash
# Builds Jaeger's UI (github.com/jaegertracing/jaeger-ui, the tag matching the Jaeger version)
# with npm into build/jaeger-ui/$VERSION, once: Jaeger's Go module embeds only a placeholder page.
# `make observe` serves it when it is there. JAEGER_UI_SRC: a checkout of jaeger-ui to build from
# (default: a shallow clone of the tag). Needs Node.js and npm (the tag asks for Node >= 24;
# Node 20.20 builds it too, with engine-strict off).
set -euo pipefail
VERSION=${JAEGER_UI_VERSION:-v1.76.0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/build/jaeger-ui/$VERSION
if [ -f "$OUT/index.html" ]; then echo "$OUT"; exit 0; fi
command -v npm >/dev/null || { echo "Node.js and npm are needed to build Jaeger's UI" >&2; exit 1; }
SRC=${JAEGER_UI_SRC:-$ROOT/build/jaeger-ui/src-$VERSION}
if [ ! -f "$SRC/package.json" ]; then
  git clone --quiet --depth 1 --branch "$VERSION" https://github.com/jaegertracing/jaeger-ui "$SRC" >&2
fi
cd "$SRC"
npm ci --no-audit --no-fund --ignore-scripts --engine-strict=false >&2
npm run --workspace @jaegertracing/plexus prepublishOnly >&2  # the graph library the UI imports
(cd packages/jaeger-ui && npm run build >&2)
rm -rf "$OUT.tmp" && cp -r packages/jaeger-ui/build "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "$OUT"
