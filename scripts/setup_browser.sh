#!/usr/bin/env bash
# Install Debian's chromium for the headless check of report.html (tests/test_report.py).
# Non-interactive and quiet. Never fails the caller: when apt is not usable (no root, no apt-get, no
# network) it prints a warning and exits 0, and the browser test skips with a reason.
set -uo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi

warn() { echo "setup_browser: warning: $*; the headless browser test will be skipped" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
  warn "apt-get not found, cannot install chromium"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
  else
    warn "not root and no passwordless sudo, cannot install chromium"
    exit 0
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup_browser: installing chromium with apt-get (once)"
if ! $SUDO apt-get update -qq >/dev/null 2>&1; then
  warn "apt-get update failed"
  exit 0
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1; then
  warn "apt-get install chromium failed"
  exit 0
fi
if [ ! -x /usr/bin/chromium ]; then
  warn "chromium was installed but /usr/bin/chromium is missing"
fi
exit 0
