/*
 * uffd_floor — the raw cost of a cross-process userfaultfd fault on shmem.
 *
 * This is the floor Farpage's fault path is measured against: the same
 * shape as Farpage (client maps a memfd MAP_SHARED, registers it MISSING with
 * a userfaultfd and hands memfd + uffd to another process over SCM_RIGHTS),
 * but the handler does nothing except install one 4 KiB page with
 * UFFDIO_COPY from a static buffer. No page table, no tiers, no eviction.
 *
 * Usage: uffd_floor [--spin] [--cpu C[,H]] [pages]     (measured pages, default 20000)
 *   --spin     the handler busy-polls its userfaultfd instead of sleeping in poll(2):
 *              the floor for a handler that never pays a wake-up (the name gets "_spin").
 *   --cpu C    pin client and handler to CPU C;
 *   --cpu C,H  pin the client to CPU C and the handler to CPU H.
 *   Placement matters more than anything else here. On VMs whose idle vCPUs
 *   halt, a fault handed to a process on the other vCPU pays two wake-ups
 *   (handler, then client) of 20-45 us each; on one CPU it pays two context
 *   switches. Without --cpu the scheduler decides, and runs land in either
 *   mode (bimodal), so compare against the pinned figures.
 * Output: one JSON line on stdout:
 *   {"name":"uffd_floor","pages":N,"p50_us":...,"p99_us":...,"mean_us":...}
 *   With --cpu the name is "uffd_floor_same_cpu" or "uffd_floor_cross_cpu"
 *   and "client_cpu"/"handler_cpu" fields follow it.
 * Exits non-zero on any error, including a page whose contents are wrong.
 *
 * Needs access to userfaultfd: root, or /dev/userfaultfd, or
 * vm.unprivileged_userfaultfd=1 (user-mode-only faults are enough here
 * because the client only touches the range from user space).
 *
 * Build: gcc -O2 -Wall -Wextra -D_GNU_SOURCE -o uffd_floor uffd_floor.c
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WARMUP_PAGES 1000UL
#define DEFAULT_PAGES 20000UL
#define FILL_BYTE 0xA5

static void die(const char *what) {
    fprintf(stderr, "uffd_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void pin_to(long cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0) die("sched_setaffinity");
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A userfaultfd for this process: /dev/userfaultfd first (works without
 * vm.unprivileged_userfaultfd for whoever may open the device), then the
 * syscall, then the syscall restricted to user-mode faults. */
static int new_uffd(void) {
    const int flags = O_CLOEXEC | O_NONBLOCK;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        close(dev);
        if (fd >= 0) return fd;
    }
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd < 0 && errno == EPERM) fd = (int)syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY);
    return fd;
}

static void send_fds(int sock, int fd0, int fd1) {
    char byte = 'F';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = sizeof ctl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(2 * sizeof(int));
    int fds[2] = {fd0, fd1};
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != 1) die("sendmsg(SCM_RIGHTS)");
}

static void recv_fds(int sock, int *fd0, int *fd1) {
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } ctl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = sizeof ctl.buf};
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n != 1) die("recvmsg(SCM_RIGHTS)");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(2 * sizeof(int))) {
        errno = EPROTO;
        die("recvmsg: no file descriptors");
    }
    int fds[2];
    memcpy(fds, CMSG_DATA(c), sizeof fds);
    *fd0 = fds[0];
    *fd1 = fds[1];
}

/* The handler: resolve every missing fault with one UFFDIO_COPY of a page that
 * carries the page index in its first 8 bytes, so the client can tell a page
 * installed at the wrong address from the right one. Returns when the client
 * closes its end of the socket (or exits). */
static int spin_handler; /* --spin */

static int run_handler(int sock) {
    int memfd, uffd;
    recv_fds(sock, &memfd, &uffd);
    close(memfd); /* UFFDIO_COPY resolves through the uffd alone; kept for the model's shape */

    uint64_t base;
    if (read(sock, &base, sizeof base) != (ssize_t)sizeof base) die("read(region base)");

    static unsigned char page[PAGE] __attribute__((aligned(4096)));
    memset(page, FILL_BYTE, sizeof page);

    struct pollfd pfd[2] = {{.fd = uffd, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    for (;;) {
        int ready = poll(pfd, 2, spin_handler ? 0 : -1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (ready == 0) continue;
        if (pfd[1].revents) return 0; /* client done: EOF or hangup */
        if (!(pfd[0].revents & POLLIN)) continue;

        struct uffd_msg m;
        ssize_t n = read(uffd, &m, sizeof m);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            die("read(uffd)");
        }
        if (n != (ssize_t)sizeof m) {
            errno = EPROTO;
            die("read(uffd): short message");
        }
        if (m.event != UFFD_EVENT_PAGEFAULT) continue;

        uint64_t addr = m.arg.pagefault.address & ~(uint64_t)(PAGE - 1);
        uint64_t index = (addr - base) / PAGE;
        memcpy(page, &index, sizeof index);
        struct uffdio_copy cp = {.dst = addr, .src = (uint64_t)(uintptr_t)page, .len = PAGE, .mode = 0};
        /* EEXIST: the page got installed meanwhile; the faulting thread was woken with it. */
        if (ioctl(uffd, UFFDIO_COPY, &cp) < 0 && errno != EEXIST) die("UFFDIO_COPY");
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static uint64_t percentile(const uint64_t *sorted, size_t n, double p) {
    size_t rank = (size_t)(p * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

static int check_page(const unsigned char *p, uint64_t index) {
    uint64_t stamp;
    memcpy(&stamp, p, sizeof stamp);
    if (stamp != index) {
        fprintf(stderr, "uffd_floor: page %" PRIu64 " carries stamp %" PRIu64 "\n", index, stamp);
        return -1;
    }
    for (size_t i = sizeof stamp; i < PAGE; i++) {
        if (p[i] != FILL_BYTE) {
            fprintf(stderr, "uffd_floor: page %" PRIu64 " byte %zu is 0x%02x\n", index, i, p[i]);
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    unsigned long measured = DEFAULT_PAGES;
    long client_cpu = -1, handler_cpu = -1;
    int argi = 1;
    if (argi < argc && strcmp(argv[argi], "--spin") == 0) {
        spin_handler = 1;
        argi++;
    }
    if (argi + 1 < argc && strcmp(argv[argi], "--cpu") == 0) {
        const char *spec = argv[argi + 1];
        char *end;
        errno = 0;
        client_cpu = handler_cpu = strtol(spec, &end, 10);
        if (!errno && end != spec && *end == ',') {
            const char *second = end + 1;
            handler_cpu = strtol(second, &end, 10);
            if (end == second) errno = EINVAL;
        }
        if (errno || end == spec || *end || client_cpu < 0 || client_cpu >= CPU_SETSIZE || handler_cpu < 0 ||
            handler_cpu >= CPU_SETSIZE) {
            fprintf(stderr, "uffd_floor: bad --cpu '%s' (want C or C,H)\n", spec);
            return 2;
        }
        argi += 2;
    }
    if (argc - argi > 1 || (argi < argc && argv[argi][0] == '-')) {
        fprintf(stderr, "usage: %s [--spin] [--cpu C[,H]] [pages]\n", argv[0]);
        return 2;
    }
    if (argi < argc) {
        char *end;
        errno = 0;
        measured = strtoul(argv[argi], &end, 10);
        if (errno || *end || measured == 0 || measured > (1UL << 24)) {
            fprintf(stderr, "uffd_floor: bad page count '%s'\n", argv[argi]);
            return 2;
        }
    }
    const size_t total = WARMUP_PAGES + measured;

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");

    /* Fork before the region exists: the handler must not have a mapping of
     * the memfd that could fill missing pages with zeros behind the uffd. */
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        if (handler_cpu >= 0) pin_to(handler_cpu);
        close(sv[0]);
        _exit(run_handler(sv[1]));
    }
    close(sv[1]);
    if (client_cpu >= 0) pin_to(client_cpu);

    int memfd = memfd_create("uffd_floor", MFD_CLOEXEC);
    if (memfd < 0) die("memfd_create");
    if (ftruncate(memfd, (off_t)(total * PAGE)) < 0) die("ftruncate");
    unsigned char *region = mmap(NULL, total * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (region == MAP_FAILED) die("mmap");

    int uffd = new_uffd();
    if (uffd < 0) die("userfaultfd (needs root, /dev/userfaultfd access or vm.unprivileged_userfaultfd=1)");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM};
    if (ioctl(uffd, UFFDIO_API, &api) < 0) die("UFFDIO_API(MISSING_SHMEM)");
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)region, .len = total * PAGE},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER(MISSING)");

    send_fds(sv[0], memfd, uffd);
    uint64_t base = (uint64_t)(uintptr_t)region;
    if (write(sv[0], &base, sizeof base) != (ssize_t)sizeof base) die("write(region base)");
    /* The handler holds its own references now. */
    close(uffd);
    close(memfd);

    uint64_t *lat = malloc(measured * sizeof *lat);
    if (!lat) die("malloc");
    int bad = 0;
    for (size_t i = 0; i < total; i++) {
        volatile const uint64_t *p = (volatile const uint64_t *)(region + i * PAGE);
        uint64_t t0 = now_ns();
        uint64_t v = *p; /* the fault */
        uint64_t t1 = now_ns();
        (void)v;
        if (i >= WARMUP_PAGES) lat[i - WARMUP_PAGES] = t1 - t0;
        if (check_page(region + i * PAGE, i) < 0) bad = 1;
    }

    /* EOF on the socket tells the handler to exit. */
    close(sv[0]);
    int status;
    if (waitpid(child, &status, 0) < 0) die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "uffd_floor: handler failed (status 0x%x)\n", status);
        return 1;
    }
    if (bad) return 1;

    double sum = 0;
    for (size_t i = 0; i < measured; i++) sum += (double)lat[i];
    qsort(lat, measured, sizeof *lat, cmp_u64);
    const char *name = spin_handler ? "uffd_floor_spin" : "uffd_floor";
    char cpu_fields[64] = "";
    if (client_cpu >= 0) {
        if (spin_handler)
            name = client_cpu == handler_cpu ? "uffd_floor_spin_same_cpu" : "uffd_floor_spin_cross_cpu";
        else
            name = client_cpu == handler_cpu ? "uffd_floor_same_cpu" : "uffd_floor_cross_cpu";
        snprintf(cpu_fields, sizeof cpu_fields, ",\"client_cpu\":%ld,\"handler_cpu\":%ld", client_cpu, handler_cpu);
    }
    printf("{\"name\":\"%s\"%s,\"pages\":%lu,\"p50_us\":%.2f,\"p99_us\":%.2f,\"mean_us\":%.2f}\n", name, cpu_fields,
           measured, (double)percentile(lat, measured, 0.50) / 1000.0,
           (double)percentile(lat, measured, 0.99) / 1000.0, sum / (double)measured / 1000.0);
    free(lat);
    munmap(region, total * PAGE);
    return 0;
}
