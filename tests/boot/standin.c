/* standin: the daemon that tests/install.rs gives a boot script to start,
 * in a chroot. A shell script would not do: the kernel hands a script's
 * interpreter an argv[0] of its own, and what is tested is the one the
 * boot script gives the daemon, '@nbd-vram', which systemd's killing
 * spree at shutdown spares.
 *
 * Started with --version (the script's probe) it exits 0. Else it writes
 * its argv[0] to /run/argv0, then does what /etc/standin says: "exit"
 * (exits 3 at once), "live" (runs on without swap) or "swap" (a second
 * later, adds /dev/nbd0 to the /proc/swaps file the script reads).
 *
 * Built static (cc -static) so that the chroot needs no libraries.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void put(const char *path, const char *mode, const char *text)
{
    FILE *f = fopen(path, mode);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0)
        return 0;
    put("/run/argv0", "w", argv[0]);
    char what[16] = "";
    FILE *f = fopen("/etc/standin", "r");
    if (f) {
        if (!fgets(what, sizeof what, f))
            what[0] = 0;
        fclose(f);
    }
    if (strncmp(what, "exit", 4) == 0)
        return 3;
    if (strncmp(what, "swap", 4) == 0) {
        sleep(1);
        put("/proc/swaps", "a", "/dev/nbd0 partition 1000 0 100\n");
    }
    sleep(120);
    return 0;
}
