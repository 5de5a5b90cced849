#!/bin/sh
# Install the Debian text packages that the built-in demo's corpus reads (docs/demo.md lists
# each source, its domain and licence). The demo works without them, on fewer and less varied
# domains, so this script never fails the build: without apt-get or root it says what to
# install and exits 0. Idempotent and quiet when everything is already installed.
#
#   scripts/install-demo-sources.sh          install what is missing
#   scripts/install-demo-sources.sh --check  only list what is missing

# The demo reads only these packages' files (and base-files'; hdee.demo_corpus.DEMO_PACKAGES
# keeps the same list). Text packages are pinned to Debian 12's versions so that every machine
# gets the same corpus; libc6-dev, locales and perl-modules receive security updates, so they
# are not pinned (corpus.json records the versions read, the report the text's fingerprint).
PINNED="bible-kjv=4.38 jargon-text=4.4.7-4.1 fortunes=1:1.99.1-7.3 fortunes-min=1:1.99.1-7.3 \
dict-gcide=0.48.5+nmu2 dict-foldoc=20230119-1 dict-devil=1.0-13.1 dict-vera=1:1.24-1 \
manpages=6.03-2"
UNPINNED="libc6-dev locales perl-modules-5.36"
PACKAGES="$(for spec in $PINNED; do printf '%s ' "${spec%%=*}"; done)$UNPINNED"

missing=""   # package names, for messages
install=""   # what apt-get installs: name=version where pinned
for spec in $PINNED $UNPINNED; do
    pkg="${spec%%=*}"
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
        install="$install $spec"
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
# A pinned version that this distribution does not have (not Debian 12) falls back to its own
# version: the demo still runs, on a corpus whose fingerprint the report shows differs.
# shellcheck disable=SC2086
if ! $SUDO apt-get install -y -q --no-install-recommends $install >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1
    # shellcheck disable=SC2086
    if ! $SUDO apt-get install -y -q --no-install-recommends $install >/dev/null 2>&1; then
        echo "hdee demo: the pinned versions are not available here; installing${missing}"
        # shellcheck disable=SC2086
        $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
            || echo "hdee demo: apt-get install${missing} failed; the demo goes on with fallbacks"
    fi
fi
exit 0
