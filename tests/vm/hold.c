/* hold: holds a block device open exclusively, as a mount or a swapon
 * does, until a file appears; then lets go and, with -s, makes it swap at
 * once.
 *
 *     hold [-s] DEVICE FILE
 *
 * Prints "hold: held DEVICE" once it holds it. Held from before a daemon
 * starts on DEVICE, it makes that daemon's swapon fail as busy every
 * time, as a swapon by the daemon's label that came first does; with -s
 * the swap area then appears while the daemon serves the device. Exit 0,
 * 1 with a "hold: FAIL ..." line, 2 for bad arguments.
 *
 * Built static (gcc -static -O2) so the VM's initramfs needs no libraries.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int swap = argc == 4 && strcmp(argv[1], "-s") == 0;
    if (argc != 3 + swap) {
        fprintf(stderr, "usage: hold [-s] DEVICE FILE\n");
        return 2;
    }
    const char *dev = argv[1 + swap], *file = argv[2 + swap];
    int fd = open(dev, O_RDONLY | O_EXCL);
    if (fd < 0) {
        printf("hold: FAIL open %s: %m\n", dev);
        return 1;
    }
    printf("hold: held %s\n", dev);
    fflush(stdout);
    struct stat st;
    while (stat(file, &st) != 0)
        usleep(10000);
    close(fd);
    /* At once: the daemon looks every 200 ms whether it may claim it, and
     * one look landing between close and swapon (microseconds) would make
     * this swapon fail as busy, the daemon's own then succeeding. */
    if (swap && swapon(dev, 0) != 0) {
        printf("hold: FAIL swapon %s: %m\n", dev);
        return 1;
    }
    printf("hold: let go of %s%s\n", dev, swap ? ", now swap" : "");
    return 0;
}
