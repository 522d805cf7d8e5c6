/* install_floor: what the kernel alone costs a sequential sweep through far memory.
 *
 * A sweep installs every page it reads (UFFDIO_COPY into a shmem-backed region registered
 * for missing and write-protect faults, as the agent registers regions) and, to stay within
 * its budget, drops as many (fallocate PUNCH_HOLE on the memfd). No fault is taken and no
 * byte crosses a network: this is the floor under any userfaultfd-based sweep on this
 * kernel, whatever the tier.
 *
 * It also times the alternative install path, pwrite into the memfd's page cache then
 * UFFDIO_CONTINUE over the range (minor-fault mode), to tell whether it would be cheaper.
 *
 * Usage: install_floor [MiB [run_pages]]   (default 1024 MiB, runs of 64 pages)
 * Prints one JSON line: install and punch cost per page, the sweep rate they allow, and the
 * pwrite + UFFDIO_CONTINUE cost per page (-1 when the kernel lacks minor faults on shmem).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "install_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
    size_t run = argc > 2 ? strtoul(argv[2], NULL, 10) : 64;
    if (mib == 0 || run == 0 || run > 4096) {
        fprintf(stderr, "usage: %s [MiB [run_pages]]\n", argv[0]);
        return 2;
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t bytes = mib << 20, pages = bytes / page;

    int memfd = (int)syscall(SYS_memfd_create, "install-floor", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)bytes) < 0) die("memfd");
    unsigned char *region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (region == MAP_FAILED) die("mmap");
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (uffd < 0) die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
    if (ioctl(uffd, UFFDIO_API, &api) < 0) die("UFFDIO_API");
    struct uffdio_register reg = {.range = {.start = (uintptr_t)region, .len = bytes},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER");

    unsigned char *staging = aligned_alloc(page, run * page);
    if (!staging) die("aligned_alloc");
    for (size_t i = 0; i < run * page; i++) staging[i] = (unsigned char)(i * 131 + 7);

    /* Install every page, write-protected (clean), in runs, as fetch-ahead does. */
    uint64_t t0 = now_ns();
    for (size_t p = 0; p < pages; p += run) {
        size_t n = pages - p < run ? pages - p : run;
        struct uffdio_copy copy = {.dst = (uintptr_t)(region + p * page), .src = (uintptr_t)staging, .len = n * page,
                                   .mode = UFFDIO_COPY_MODE_WP};
        if (ioctl(uffd, UFFDIO_COPY, &copy) < 0) die("UFFDIO_COPY");
    }
    uint64_t t1 = now_ns();
    /* Check one page per run landed. */
    for (size_t p = 0; p < pages; p += run)
        if (region[p * page + 5] != staging[5]) {
            fprintf(stderr, "install_floor: page %zu has wrong contents\n", p);
            return 1;
        }
    /* Drop them again, in the eviction's batches: write-protect is already on; punch the memfd. */
    uint64_t t2 = now_ns();
    for (size_t p = 0; p < pages; p += run) {
        size_t n = pages - p < run ? pages - p : run;
        if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(p * page), (off_t)(n * page)) < 0)
            die("fallocate(PUNCH_HOLE)");
    }
    uint64_t t3 = now_ns();

    /* The alternative: fill the page cache with pwrite, then map with UFFDIO_CONTINUE (minor
     * faults). Same region, registered again for minor faults; skipped if the kernel lacks it. */
    double continue_us = -1;
    struct uffdio_range all = {.start = (uintptr_t)region, .len = bytes};
    int cfd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (cfd < 0) cfd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    struct uffdio_api capi = {.api = UFFD_API, .features = UFFD_FEATURE_MINOR_SHMEM};
    if (ioctl(uffd, UFFDIO_UNREGISTER, &all) == 0 && cfd >= 0 && ioctl(cfd, UFFDIO_API, &capi) == 0) {
        struct uffdio_register creg = {.range = all, .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR};
        if (ioctl(cfd, UFFDIO_REGISTER, &creg) == 0) {
            uint64_t c0 = now_ns();
            for (size_t p = 0; p < pages; p += run) {
                size_t n = pages - p < run ? pages - p : run;
                if (pwrite(memfd, staging, n * page, (off_t)(p * page)) != (ssize_t)(n * page)) die("pwrite");
                struct uffdio_continue cont = {.range = {.start = (uintptr_t)(region + p * page), .len = n * page}};
                if (ioctl(cfd, UFFDIO_CONTINUE, &cont) < 0) die("UFFDIO_CONTINUE");
            }
            continue_us = (double)(now_ns() - c0) / 1e3 / (double)pages;
            for (size_t p = 0; p < pages; p += run)
                if (region[p * page + 5] != staging[5]) {
                    fprintf(stderr, "install_floor: page %zu has wrong contents after CONTINUE\n", p);
                    return 1;
                }
        }
    }
    double install_us = (double)(t1 - t0) / 1e3 / (double)pages;
    double punch_us = (double)(t3 - t2) / 1e3 / (double)pages;
    double sweep_gbps = (double)page / ((install_us + punch_us) * 1e3);
    printf("{\"name\":\"install_floor\",\"pages\":%zu,\"run_pages\":%zu,\"install_us_per_page\":%.3f,"
           "\"punch_us_per_page\":%.3f,\"install_gbps\":%.3f,\"sweep_floor_gbps\":%.3f,"
           "\"pwrite_continue_us_per_page\":%.3f}\n",
           pages, run, install_us, punch_us, (double)page / (install_us * 1e3), sweep_gbps, continue_us);
    return 0;
}
