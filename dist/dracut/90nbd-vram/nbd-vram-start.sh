#!/bin/sh
# dracut pre-mount hook (sourced, not run: no `exit`): starts the nbd-vram
# swap daemon in the background and waits, bounded, for its swap.
#
# The daemon must outlive the initramfs. An image that runs systemd does
# not start it (module-setup.sh): at switch_root systemd stops every
# process, which ends the device, before it spares root processes whose
# argv[0] starts with '@' (systemd.io/ROOT_STORAGE_DAEMONS) from its
# SIGTERM. dracut's own init kills nothing at switch_root. The daemon is
# started as '@nbd-vram' where the shell can do that (bash, busybox; not
# dash) all the same, for systemd's final shutdown spree, which comes
# after systemd has swapped the device off.
# The units cannot adopt it and skip themselves while
# /run/nbd-vram/initramfs exists (written below; /run moves to the real
# root). At switch_root it follows init into the real root, and it serves,
# reports and stops through descriptors even where that fails; see
# nbd-vram(8), "Starting from the initramfs".

nbd_vram_start() {
    local dev="" swap=yes prev="" a pid waited=0 info minor uvm
    local log=/run/initramfs/nbd-vram.log
    NBD_VRAM_ARGS="--size 7168 --device /dev/nbd0 --priority 100"
    NBD_VRAM_WAIT=30
    NBD_VRAM_LIBCUDA=
    NBD_VRAM_LIBCUDA_IMAGE=
    [ -x /usr/bin/nbd-vram ] && [ -r /etc/default/nbd-vram ] || return 0
    # module-setup.sh leaves the daemon out of an image that runs systemd,
    # which stops every process at switch_root (see there).
    if [ -n "$DRACUT_SYSTEMD" ]; then
        warn "nbd-vram: not started from an initramfs that runs systemd; the systemd units start it after boot"
        return 0
    fi
    . /etc/default/nbd-vram
    [ -r /etc/nbd-vram/initramfs.conf ] && . /etc/nbd-vram/initramfs.conf
    NBD_VRAM_LIBCUDA=${NBD_VRAM_LIBCUDA:-$NBD_VRAM_LIBCUDA_IMAGE}
    # A wait that is no number would never end: boot must go on.
    case "$NBD_VRAM_WAIT" in
    '' | *[!0-9]*)
        warn "nbd-vram: NBD_VRAM_WAIT='$NBD_VRAM_WAIT' is no number of seconds; waiting 30"
        NBD_VRAM_WAIT=30
        ;;
    esac
    [ -e /run/nbd-vram/initramfs ] && return 0

    modprobe -q nbd || warn "nbd-vram: modprobe nbd failed"
    modprobe -q nvidia_uvm || warn "nbd-vram: modprobe nvidia_uvm failed"
    # The NVIDIA modules create no device nodes; libcuda does as root, and
    # so do we, as nvidia-modprobe would.
    [ -e /dev/nvidiactl ] || mknod -m 0666 /dev/nvidiactl c 195 255 2>/dev/null
    for info in /proc/driver/nvidia/gpus/*/information; do
        [ -r "$info" ] || continue
        minor=$(sed -n 's/^Device Minor:[[:space:]]*//p' "$info")
        [ -n "$minor" ] && [ ! -e "/dev/nvidia$minor" ] && mknod -m 0666 "/dev/nvidia$minor" c 195 "$minor" 2>/dev/null
    done
    uvm=$(sed -n 's/^\([0-9]*\) nvidia-uvm$/\1/p' /proc/devices)
    if [ -n "$uvm" ]; then
        [ -e /dev/nvidia-uvm ] || mknod -m 0666 /dev/nvidia-uvm c "$uvm" 0 2>/dev/null
        [ -e /dev/nvidia-uvm-tools ] || mknod -m 0666 /dev/nvidia-uvm-tools c "$uvm" 1 2>/dev/null
    fi

    for a in $NBD_VRAM_ARGS; do
        [ "$prev" = --device ] && dev=$a
        case "$a" in
        --device=*) dev=${a#--device=} ;;
        --no-swap) swap=no ;;
        esac
        prev=$a
    done
    [ "$dev" = auto ] && dev=

    mkdir -p /run/initramfs /run/nbd-vram
    info "nbd-vram: starting ($NBD_VRAM_ARGS), log in $log"
    # shellcheck disable=SC2086 # NBD_VRAM_ARGS is a list of words
    if (exec -a @nbd-vram /usr/bin/nbd-vram --version) >/dev/null 2>&1; then
        (
            [ -n "$NBD_VRAM_LIBCUDA" ] && export NBD_VRAM_LIBCUDA || unset NBD_VRAM_LIBCUDA
            exec -a @nbd-vram /usr/bin/nbd-vram $NBD_VRAM_ARGS
        ) </dev/null >>"$log" 2>&1 &
    else
        (
            [ -n "$NBD_VRAM_LIBCUDA" ] && export NBD_VRAM_LIBCUDA || unset NBD_VRAM_LIBCUDA
            exec /usr/bin/nbd-vram $NBD_VRAM_ARGS
        ) </dev/null >>"$log" 2>&1 &
    fi
    pid=$!

    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            warn "nbd-vram exited at start; see $log (the systemd unit may try again)"
            return 0
        fi
        if [ "$swap" = no ]; then
            [ "$waited" -ge 1 ] && break
        elif [ -n "$dev" ]; then
            grep -q "^$dev[[:space:]]" /proc/swaps && break
        else
            grep -q '^/dev/nbd' /proc/swaps && break
        fi
        if [ "$waited" -ge "$NBD_VRAM_WAIT" ]; then
            warn "nbd-vram: no swap after $NBD_VRAM_WAIT s; it goes on in the background (see $log)"
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "$pid" >/run/nbd-vram/initramfs
}

nbd_vram_start
