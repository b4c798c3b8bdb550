/*
 * The test guest's memory checker (scripts/test-guest, kernel argument vmsnap.memcheck=MIB).
 *
 * Sweeps a buffer of MIB MiB without end: stores the sweep's number in every 4 KiB page, then
 * reads every page back. A guest restored from a memory image that missed some of its writes
 * (pages saved as they were before their last store) finds them holding an older sweep's
 * number and prints each one:
 *     vmsnap-memcheck BAD sweep S page P holds V
 * and, at most once a second of guest time, how far it is:
 *     vmsnap-memcheck sweep S bad N
 * One word a page is enough: a page is saved whole or not at all.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

enum { page_words = 4096 / sizeof(uint64_t) };

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
    if (mib == 0 || mib > 4096) {
        fprintf(stderr, "vmsnap-memcheck: MIB must be 1-4096, not %s\n", argc > 1 ? argv[1] : "");
        return 2;
    }
    size_t pages = mib * 256;
    volatile uint64_t *buffer = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buffer == MAP_FAILED) {
        perror("vmsnap-memcheck: mmap");
        return 1;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    uint64_t sweep = 0, bad = 0;
    time_t shown = 0;
    for (;;) {
        sweep++;
        for (size_t p = 0; p < pages; p++) buffer[p * page_words] = sweep;
        for (size_t p = 0; p < pages; p++) {
            uint64_t held = buffer[p * page_words];
            if (held != sweep) {
                bad++;
                printf("vmsnap-memcheck BAD sweep %llu page %zu holds %llu\n", (unsigned long long)sweep, p,
                       (unsigned long long)held);
                buffer[p * page_words] = sweep;
            }
        }
        time_t now = time(NULL);
        if (now != shown) {
            printf("vmsnap-memcheck sweep %llu bad %llu\n", (unsigned long long)sweep, (unsigned long long)bad);
            shown = now;
        }
    }
}
