/* The kernel UAPI that nbd-vram speaks; bindgen turns it into src/nbd/bindings.rs. */
#include <linux/ioctl.h> /* <linux/nbd.h> uses _IO without including it */
#include <linux/nbd.h>

/*
 * The ioctl numbers are function-like macros (_IO), which bindgen cannot
 * evaluate; an enum makes clang compute them.
 */
enum nbd_vram_ioctl {
	NBD_VRAM_SET_SOCK = NBD_SET_SOCK,
	NBD_VRAM_SET_BLKSIZE = NBD_SET_BLKSIZE,
	NBD_VRAM_DO_IT = NBD_DO_IT,
	NBD_VRAM_CLEAR_SOCK = NBD_CLEAR_SOCK,
	NBD_VRAM_CLEAR_QUE = NBD_CLEAR_QUE,
	NBD_VRAM_SET_SIZE_BLOCKS = NBD_SET_SIZE_BLOCKS,
	NBD_VRAM_DISCONNECT = NBD_DISCONNECT,
	NBD_VRAM_SET_TIMEOUT = NBD_SET_TIMEOUT,
	NBD_VRAM_SET_FLAGS = NBD_SET_FLAGS,
};

/*
 * Write-zeroes reached <linux/nbd.h> only in newer kernels (Debian 12's
 * 6.1 header lacks it). Where the header is older, take the values from
 * the NBD protocol spec ("Transmission flags", "Request types"), which the
 * header copies.
 */
#ifdef NBD_FLAG_SEND_WRITE_ZEROES
enum nbd_vram_write_zeroes { NBD_VRAM_CMD_WRITE_ZEROES = NBD_CMD_WRITE_ZEROES };
#else
#define NBD_FLAG_SEND_WRITE_ZEROES (1 << 6)
enum nbd_vram_write_zeroes { NBD_VRAM_CMD_WRITE_ZEROES = 6 };
#endif

/* Also used by the swap daemon, and not in the libc crate for glibc targets. */
#include <sys/swap.h>    /* SWAP_FLAG_PREFER, SWAP_FLAG_DISCARD, SWAP_FLAG_PRIO_MASK */
#include <linux/prctl.h> /* PR_SET_IO_FLUSHER (Linux 5.6) */
#include <linux/magic.h> /* RAMFS_MAGIC: an initramfs root */
