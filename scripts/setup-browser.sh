#!/usr/bin/env bash
# The browser the console's end-to-end tests drive (test/console-browser.test.ts): Debian's chromium,
# with CJK fonts so the Chinese pages render in screenshots. playwright-core drives it; its own browser
# download (`playwright install`) is not used. As root, installs what is missing with apt; otherwise says
# what to run.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
fc-list 2>/dev/null | grep -qi 'noto sans cjk' || need+=(fonts-noto-cjk)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup-browser: installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  exit 0
fi
echo "setup-browser: the console's browser tests need ${need[*]}; as root run: apt-get install -y ${need[*]}" >&2
[ -x /usr/bin/chromium ] || exit 1
