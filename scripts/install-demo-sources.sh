#!/bin/sh
# Install the Debian text packages that the built-in demo's corpus reads (docs/demo.md lists
# each source, its domain and licence). The demo works without them, on fewer and less varied
# domains, so this script never fails the build: without apt-get or root it says what to
# install and exits 0. Idempotent and quiet when everything is already installed.
#
#   scripts/install-demo-sources.sh          install what is missing
#   scripts/install-demo-sources.sh --check  only list what is missing

PACKAGES="bible-kjv jargon-text fortunes fortunes-min dict-gcide dict-foldoc dict-devil \
dict-vera manpages libc6-dev locales"

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
[ -z "$missing" ] && exit 0

if [ "${1:-}" = "--check" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "hdee demo: for the full demo corpus install:${missing} (apt-get install${missing})"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"  # -n: never stop `make demo` to ask for a password
else
    echo "hdee demo: not root; for the full demo corpus run: sudo apt-get install${missing}"
    exit 0
fi

echo "hdee demo: installing the demo's text sources:${missing}"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale on a fresh machine; update once, only when needed.
# shellcheck disable=SC2086
if ! $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
        || echo "hdee demo: apt-get install${missing} failed; the demo goes on with fallbacks"
fi
exit 0
