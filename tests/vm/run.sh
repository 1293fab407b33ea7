#!/bin/sh
# tests/vm/run.sh [--check|--bench]: the kernel path of nbd-vram, in a VM.
#
# Boots Debian's own kernel (this machine's has no nbd driver) in qemu TCG
# with 256 MiB of RAM and an initramfs holding nbd-vram, a fake libcuda whose
# "VRAM" is an ivshmem BAR (memory outside guest RAM, as VRAM is), and a
# memory hog; tests/vm/init does the work in the guest:
#   (default)  a swapon beaten to the device by another; two instances
#              claiming devices at once; nbd-vram as swap
#              (--discard) under a hog 1.5x guest RAM, then
#              stopped while swap holds pages RAM cannot take back; again,
#              stopped while another swapoff reads its pages back; again,
#              stopped from a new root after a simulated switch_root
#   --check    the VM itself: modules load, ivshmem BAR works, hog and
#              nbd-vram --help run, the hog is OOM-killed without swap
#   --bench    the same hog (pages compressing 8:1) timed on zram, a virtio
#              disk and nbd-vram: one VM-STAT line each
# Exits 0 when the guest prints "VM-TEST: PASS", 1 otherwise. Kernel and
# modules are cached under target/vm/kernel (delete it to fetch again).
# Knobs: VM_TIMEOUT (s), VM_SILENT (s, the hang watchdog), VM_INIT (a /init
# of your own, to debug), VM_APPEND (more kernel command line: KEY=value
# words the kernel does not know reach /init, and nbd-vram, as environment,
# e.g. VM_APPEND=NBD_VRAM_SPIN=0). The console log is target/vm/console-MODE.log.
set -eu
cd "$(dirname "$0")/../.."

MODE=test TIMEOUT=720
case ${1:-} in
"") ;;
--check) MODE=check TIMEOUT=300 ;;
--bench) MODE=bench TIMEOUT=1200 ;;
*) echo "usage: $0 [--check|--bench]" >&2; exit 2 ;;
esac
TIMEOUT=${VM_TIMEOUT:-$TIMEOUT}
VM=target/vm
K=$VM/kernel
R=$VM/root
# Modules kept from the kernel package (relative to lib/modules/*/kernel).
MODULES="drivers/block/nbd mm/zsmalloc drivers/block/zram/zram
  drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
  drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk"

# One run at a time: runs share target/vm (and two TCG guests would starve
# each other anyway).
mkdir -p $VM
exec 9>$VM/lock
flock -n 9 || { echo "run.sh: waiting for another VM run to finish"; flock 9; }

# 1. Debian's kernel, downloaded once. Built into a temporary directory and
# renamed at the end, so an interrupted download leaves no half cache.
if [ ! -e $K/vmlinuz ]; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$pkg" ] || { echo "run.sh: no linux-image-amd64 in apt's lists (apt-get update?)" >&2; exit 1; }
    echo "run.sh: downloading $pkg"
    rm -rf $VM/dl $K.tmp
    mkdir -p $VM/dl $K.tmp
    chmod 777 $VM/dl # else apt warns that _apt cannot write there
    (cd $VM/dl && apt-get -q download "$pkg")
    # Extract only what is kept: the whole package is 400 MB unpacked.
    dpkg-deb --fsys-tarfile $VM/dl/*.deb | tar -x -C $VM/dl --wildcards './boot/vmlinuz-*' \
        $(for m in $MODULES; do echo "./lib/modules/*/kernel/$m.ko"; done)
    cp $VM/dl/boot/vmlinuz-* $K.tmp/vmlinuz
    for m in $MODULES; do cp $VM/dl/lib/modules/*/kernel/$m.ko $K.tmp/; done
    echo "$pkg" >$K.tmp/package
    rm -rf $VM/dl
    mv $K.tmp $K
fi

# 2. The initramfs, rebuilt every run (a second or two).
[ -x target/release/nbd-vram ] || cargo build --release
rm -rf $R
mkdir -p $R/bin $R/lib/modules $R/proc $R/sys $R/dev $R/tmp
cp /bin/busybox $R/bin/ # busybox-static: needs no libraries
for a in $(busybox --list); do [ -e $R/bin/$a ] || ln -s busybox $R/bin/$a; done
gcc -static -O2 -Wall -o $R/bin/hog tests/vm/hog.c
gcc -static -O2 -Wall -o $R/bin/hold tests/vm/hold.c
cc -shared -fPIC -O2 -o $R/lib/libcuda.so.1 tests/fake_cuda/libcuda.c
cp target/release/nbd-vram $R/bin/
# A dynamic program needs the loader and every library ldd lists, at the
# same paths (the vdso has no path and is skipped).
for f in target/release/nbd-vram $R/lib/libcuda.so.1; do
    ldd $f | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'
done | sort -u | while read -r lib; do
    mkdir -p $R$(dirname $lib)
    cp -L $lib $R$lib
done
cp $K/*.ko $R/lib/modules/
cp ${VM_INIT:-tests/vm/init} $R/init
chmod 755 $R/init
CPIO=cpio
command -v cpio >/dev/null || CPIO="busybox cpio"
# Uncompressed: TCG would spend longer inflating it than the copy saves.
(cd $R && find . | $CPIO -o -H newc -R 0:0) >$VM/initrd.cpio

# 3. Boot. The "VRAM": 1 GiB of /dev/shm shared with the guest as an
# ivshmem BAR. A virtio disk for the disk tier of --check and --bench.
SHM=/dev/shm/nbd-vram-vm-$$
LOG=$VM/console-$MODE.log
qemu=
trap 'rm -f "$SHM" $VM/monitor.in; [ -z "$qemu" ] || kill $qemu 2>/dev/null || true' EXIT
trap 'exit 1' INT TERM # dash skips the EXIT trap when killed by a signal
set --
if [ $MODE != test ]; then
    truncate -s 1G $VM/swap.img # sparse
    set -- -drive file=$VM/swap.img,format=raw,if=virtio
fi
# The monitor, for the watchdog below: commands go in through a fifo that
# this shell holds open read-write, so writing never blocks, even after
# qemu is gone; replies land in $VM/monitor.out.
rm -f $VM/monitor.in
mkfifo $VM/monitor.in
: >$VM/monitor.out
exec 3<>$VM/monitor.in
echo "run.sh: booting the VM ($MODE, at most $TIMEOUT s; console: $LOG)"
start=$(date +%s)
# -accel kvm hangs on this host (no vmx): TCG. -no-reboot plus panic=-1: a
# dead /init ends qemu too. stdin from /dev/null: -nographic would otherwise
# take over the terminal.
timeout $TIMEOUT qemu-system-x86_64 -accel tcg -m 256M -smp 2 -nographic -no-reboot -nic none \
    -kernel $K/vmlinuz -initrd $VM/initrd.cpio \
    -append "console=ttyS0 quiet panic=-1 vmtest=$MODE ${VM_APPEND:-}" \
    -object memory-backend-file,id=vram,size=1G,mem-path=$SHM,share=on \
    -device ivshmem-plain,memdev=vram -monitor pipe:$VM/monitor "$@" \
    </dev/null >$LOG 2>&1 3>&- 9>&- &
qemu=$!
# Silence watchdog: guest userspace prints at least a heartbeat every 20 s,
# so no new line from it (kernel lines, "[ time ] ...", do not count: a
# stuck nbd request is reported every 30 s) for $SILENT s means a wedged
# guest, the swap deadlock this test is about. Dump its state with sysrq
# (m: memory, l: CPUs, t: all tasks, w: blocked tasks, last so it lands in
# the tail) and stop it, rather than burn CPU until the timeout.
SILENT=${VM_SILENT:-90}
lines=0 quiet=0
while kill -0 $qemu 2>/dev/null; do
    sleep 1
    new=$(tr -d '\r' <$LOG | grep -acv '^\[' || true)
    if [ "$new" != "$lines" ]; then lines=$new quiet=0; else quiet=$((quiet + 1)); fi
    if [ $quiet = "$SILENT" ]; then
        echo "run.sh: no line from guest userspace for $SILENT s: hung; sysrq dumps into $LOG, then stop"
        for k in 8 m l t w; do echo "sendkey alt-sysrq-$k" >&3; sleep 3; done
        sleep 10
        kill $qemu
    fi
done
rc=0
wait $qemu || rc=$?
echo "run.sh: qemu exited with status $rc after $(($(date +%s) - start)) s$([ $rc = 124 ] && echo ' (timed out)')"

# 4. The verdict, from the console (serial lines end in \r\n).
tr -d '\r' <$LOG | grep -ao 'VM-STAT: .*' || true
# The daemon's own account of each slice it gave back.
tr -d '\r' <$LOG | grep -ao 'swapoff /dev/nbd[0-9]* done: .* moved out in .*' | sed 's/^/VM-STAT: elastic /' || true
tr -d '\r' <$LOG | grep -ao 'gave back slice .*' | sed 's/^/VM-STAT: elastic /' || true
result=$(tr -d '\r' <$LOG | grep -ao 'VM-TEST: .*' | tail -n 1)
# The guest sees that swap stayed up after the stop; only the console shows
# that the daemon itself met the refusal and kept retrying.
if [ "$result" = "VM-TEST: PASS" ] && [ $MODE = test ] &&
    ! tr -d '\r' <$LOG | grep -aq 'RAM cannot take the swapped pages back yet; still serving them'; then
    result="VM-TEST: FAIL the guest passed, but nbd-vram never logged a refused swapoff"
fi
if [ "$result" = "VM-TEST: PASS" ]; then
    echo "$result"
    exit 0
fi
if [ $quiet -ge "$SILENT" ]; then
    # What the CPUs were doing (sysrq l): for a livelock, the culprit.
    echo "--- CPU backtraces from $LOG (unreliable '?' frames left out) ---"
    tr -d '\r' <$LOG | sed -n '/sysrq: Show backtrace of all active CPUs/,/sysrq: Show State/p' | grep -v ' ? '
fi
echo "--- last 40 lines of $LOG ---"
tr -d '\r' <$LOG | tail -n 40
echo "${result:-VM-TEST: FAIL no verdict on the console}"
exit 1
