#!/usr/bin/env bash
# Makes sure redis-server (and redis-cli) are installed, for the Redis tier's
# tests (tests/store_redis.rs). Idempotent: does nothing when redis-server is
# already on PATH. The tests start and stop their own servers.
set -euo pipefail

if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y redis-server; then
        $SUDO apt-get update
        $SUDO apt-get install -y redis-server
    fi
fi

redis-server --version
