#!/bin/sh
# Installs what building and testing nbd-vram need, when missing (Debian/Ubuntu, as root).
# qemu-utils is named with qemu-system-x86 in one command: asked for alone,
# qemu-system-x86 makes apt remove a newer preinstalled qemu-utils (backports).
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-io || need="$need qemu-utils"
have qemu-system-x86_64 || need="$need qemu-system-x86 qemu-utils"
have nbdinfo || need="$need libnbd-bin"
have nbdsh || need="$need libnbd-bin python3-libnbd"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need="$need python3-libnbd"
have nbdkit || need="$need nbdkit"
have systemd-analyze || need="$need systemd"
have man || need="$need man-db"
have groff || need="$need groff-base"
have cc || need="$need gcc libc6-dev"
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need="$need busybox-static"
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need="$need libclang-dev"
[ -e /usr/include/linux/nbd.h ] || need="$need linux-libc-dev"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "missing packages:$need (run 'sudo make deps')" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Before the version lookup: a stale list names a build the mirror no longer has.
apt-get update -q
case "$need" in *qemu-system-x86*)
	# Pair qemu-utils with qemu-system-x86 from the same suite, whatever the base image had.
	suite=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/{print $2}')
	need=$(echo "$need" | sed "s/qemu-utils/qemu-utils=$suite/g") ;;
esac
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends --allow-downgrades $(echo $need | tr ' ' '\n' | sort -u)
