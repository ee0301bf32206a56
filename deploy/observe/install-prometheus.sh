#!/usr/bin/env bash
# Prometheus for `make observe` and its tests: Debian's package (prometheus, promtool), installed
# once; with `prometheus` already on PATH this does nothing. The package's service is not used:
# observe.sh runs the binary as a plain process with a config of its own.
set -euo pipefail
command -v prometheus >/dev/null && command -v promtool >/dev/null && exit 0
command -v apt-get >/dev/null || { echo "install Prometheus (https://prometheus.io/download/) and put it on PATH" >&2; exit 1; }
echo "installing Debian's prometheus package" >&2
if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
$sudo apt-get update -qq
# policy-rc.d-less containers and hosts with systemd alike: the package's own service stays off.
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  echo "note: the package started its own prometheus service on :9090; observe.sh uses its own port" >&2
fi
