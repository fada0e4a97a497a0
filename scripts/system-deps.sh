#!/usr/bin/env bash
# System tools the test suite needs beyond the virtualenv: iptables, ip (iproute2), setpriv
# (util-linux), curl and tcpdump, for the transparent-capture and network-namespace tests.
# Called by `make test` (and so by .ci/run). Quick when every tool is already there: nothing
# runs but `command -v`. Otherwise installs the Debian/Ubuntu packages with apt-get when
# running as root, or through sudo when it needs no password; anywhere else it says what is
# missing and exits 0, and the tests that need those tools skip.
set -euo pipefail

tools=(iptables ip setpriv curl tcpdump)
declare -A package_of=([iptables]=iptables [ip]=iproute2 [setpriv]=util-linux [curl]=curl [tcpdump]=tcpdump)

missing=()
packages=()
for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("$tool")
    packages+=("${package_of[$tool]}")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

say() { echo "system-deps: $*" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
  say "missing ${missing[*]}; no apt-get here: install ${packages[*]} yourself (tests needing them skip)"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root() { DEBIAN_FRONTEND=noninteractive "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root() { sudo -n DEBIAN_FRONTEND=noninteractive "$@"; }
else
  say "missing ${missing[*]}; not root and no password-less sudo: run 'sudo $0' (tests needing them skip)"
  exit 0
fi

say "installing ${packages[*]} (for ${missing[*]})"
as_root apt-get update -qq || say "apt-get update failed; trying the install anyway"
if ! as_root apt-get install -y -qq --no-install-recommends "${packages[@]}"; then
  # tcpdump is only for debugging captures: never let it block the rest.
  rest=()
  for p in "${packages[@]}"; do [ "$p" = tcpdump ] || rest+=("$p"); done
  if [ "${#rest[@]}" -ne 0 ]; then
    as_root apt-get install -y -qq --no-install-recommends "${rest[@]}"
  fi
fi
still=()
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || still+=("$tool")
done
if [ "${#still[@]}" -ne 0 ]; then
  say "still missing after the install: ${still[*]}"
fi
