#!/usr/bin/env bash
# Installs the Debian packages the VM tests need (make vm-deps; the list is VM_DEB_PACKAGES in
# the Makefile): one apt-get update, then apt-get install of the missing ones.
# Exit status: 0 ready; 2 cannot install here (not Debian, not root), with a SKIPPED line;
# 1 the installation failed.
set -uo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null || [ ! -e /etc/debian_version ]; then
  echo "SKIPPED VM tests: not a Debian system (they need Debian's packages: ${missing[*]})" >&2; exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "SKIPPED VM tests: missing Debian packages: ${missing[*]} — run make test-vm as root so it installs them" >&2; exit 2
fi
echo "installing (VM tests): ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" || {
  echo "make: installing the VM tests' packages failed" >&2; exit 1; }
