/* preads FILE BLOCK N...: for each N, what `dd if=FILE bs=BLOCK skip=N count=1` writes, in one process.
 *
 * The tiny guest's random reader (tests/harness/tinyguest.py builds it static into the initramfs as
 * /bin/preads). Each block is read as dd reads it: the file opened, one pread of BLOCK bytes at N * BLOCK,
 * closed again; the bytes go to stdout. Under QEMU TCG a process start costs ~10 ms, a dd per read was most
 * of a 4000-read test's time. Exits 1 with a message naming the block on any failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long number(const char *s, const char *what) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, "preads: %s is not a non-negative number: %s\n", what, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: preads FILE BLOCK [N...]\n");
        return 2;
    }
    long bs = number(argv[2], "BLOCK");
    char *buf = malloc(bs ? bs : 1);
    if (buf == NULL) {
        fprintf(stderr, "preads: no memory for a block of %ld bytes\n", bs);
        return 1;
    }
    for (int i = 3; i < argc; i++) {
        long n = number(argv[i], "N");
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) {
            fprintf(stderr, "preads: %s: %s\n", argv[1], strerror(errno));
            return 1;
        }
        ssize_t got = pread(fd, buf, bs, (off_t)n * bs);
        if (got < 0) {
            fprintf(stderr, "preads: %s block %ld: %s\n", argv[1], n, strerror(errno));
            return 1;
        }
        close(fd);
        for (ssize_t done = 0; done < got;) {
            ssize_t w = write(1, buf + done, got - done);
            if (w <= 0) {
                fprintf(stderr, "preads: write: %s\n", w < 0 ? strerror(errno) : "nothing written");
                return 1;
            }
            done += w;
        }
    }
    return 0;
}
