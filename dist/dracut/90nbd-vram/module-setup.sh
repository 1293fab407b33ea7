#!/bin/bash
# dracut module for nbd-vram: the swap daemon, started from the initramfs
# before the root file system is mounted (see nbd-vram-start.sh).
#
# Included when /etc/default/nbd-vram says NBD_VRAM_INITRAMFS=yes, or when
# asked for: add_dracutmodules+=" nbd-vram " in /etc/dracut.conf.d/. Then
# `dracut -f`, and again after every NVIDIA driver update: the modules,
# firmware and libcuda.so.1 in the image must match the installed driver.

# Where things are on this machine (make install rewrites the prefix).
NBD_VRAM_BIN=/usr/local/bin/nbd-vram
NBD_VRAM_CONFIG=/etc/default/nbd-vram

# Reads the config into the environment, with defaults.
nbd_vram_config() {
    NBD_VRAM_INITRAMFS=no
    NBD_VRAM_LIBCUDA=
    # shellcheck disable=SC1090
    [ -r "$NBD_VRAM_CONFIG" ] && . "$NBD_VRAM_CONFIG"
}

# 0: include by default; 255: only when asked for; 1: cannot.
check() {
    [ -x "$NBD_VRAM_BIN" ] || return 1
    nbd_vram_config
    case "$NBD_VRAM_INITRAMFS" in
    yes | y | true | 1) return 0 ;;
    esac
    return 255
}

# Whether the image runs systemd: at switch_root it stops every process
# (SIGSTOP, then SIGCONT, '@' or not), and a stop ends an NBD device whose
# server waits in NBD_DO_IT, under swap. Such an image does not start the
# daemon; the systemd units do, after boot.
nbd_vram_systemd_image() {
    dracut_module_included systemd
}

depends() {
    # Nothing but the base; udev (for /dev/nbdN) is part of every image.
    return 0
}

installkernel() {
    nbd_vram_systemd_image && return 0
    # Whether or not it is loaded now: hostonly leaves out modules that
    # are not, and nbd is loaded only by the daemon or at the next boot.
    hostonly='' instmods nbd
    # nvidia-uvm pulls in nvidia; cuInit needs both (nvidia-modeset and
    # nvidia-drm are display-only). instmods also installs the firmware
    # the modules list: the GSP images under /lib/firmware/nvidia/VERSION/
    # that nvidia.ko loads on Turing and later GPUs.
    hostonly='' instmods nvidia nvidia_uvm
}

# The libcuda.so.1 to install: the configured one, or the one the loader
# would pick for this machine's word size.
nbd_vram_libcuda() {
    local abi
    if [ -n "$NBD_VRAM_LIBCUDA" ]; then
        echo "$NBD_VRAM_LIBCUDA"
        return
    fi
    case "$(uname -m)" in
    x86_64) abi="x86-64" ;;
    aarch64) abi="AArch64" ;;
    *) abi="" ;;
    esac
    ldconfig -p 2>/dev/null | awk -v abi="$abi" '$1 == "libcuda.so.1" && index($0, abi) { print $NF; exit }'
}

install() {
    local libcuda
    if nbd_vram_systemd_image; then
        dwarn "nbd-vram: not started from this image, which runs systemd: systemd stops every process at switch_root, which would end the device under swap; the systemd units start it after boot"
        return 0
    fi
    nbd_vram_config
    inst_binary "$NBD_VRAM_BIN" /usr/bin/nbd-vram
    inst_simple "$NBD_VRAM_CONFIG" /etc/default/nbd-vram
    libcuda=$(nbd_vram_libcuda)
    if [ -n "$libcuda" ] && [ -f "$libcuda" ]; then
        inst_library "$libcuda"
        # Loaded by name at run time, so no library walk finds them:
        # libcuda's PTX compiler (without it, no copy or mailbox kernel)
        # and NVML, which nbd-vram loads to see other processes on the GPU.
        for lib in libnvidia-ptxjitcompiler.so.1 libnvidia-ml.so.1; do
            if [ -e "${libcuda%/*}/$lib" ]; then
                inst_library "${libcuda%/*}/$lib"
            fi
        done
        # The start script tells the daemon where it is.
        mkdir -p "${initdir}/etc/nbd-vram"
        echo "NBD_VRAM_LIBCUDA_IMAGE='$libcuda'" >"${initdir}/etc/nbd-vram/initramfs.conf"
    else
        dwarn "nbd-vram: no libcuda.so.1 (install the NVIDIA driver or set NBD_VRAM_LIBCUDA in $NBD_VRAM_CONFIG)"
    fi
    inst_multiple -o nvidia-modprobe mknod sed grep
    inst_hook pre-mount 50 "$moddir/nbd-vram-start.sh"
}
