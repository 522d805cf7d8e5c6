/*
 * tcp_floor.c — the raw TCP loopback floor for the pool benchmarks: round-trip latency of
 * a 24-byte request answered with 4 KiB (a page fetch without any protocol work), and the
 * bulk bandwidth of one stream. A forked server process answers; both can be pinned.
 *
 * Usage: tcp_floor [--cpu C,S] [round_trips]
 * Prints one JSON line: {"name":"tcp_floor...","rtt_p50_us":..,"rtt_p99_us":..,"bulk_gbps":..}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void pin(long cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0) die("sched_setaffinity");
}

static void full(int fd, void *buf, size_t len, int sending) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = sending ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die(sending ? "send" : "recv");
        p += n;
        len -= (size_t)n;
    }
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long client_cpu = -1, server_cpu = -1;
    int argi = 1;
    if (argi + 1 < argc && strcmp(argv[argi], "--cpu") == 0) {
        if (sscanf(argv[argi + 1], "%ld,%ld", &client_cpu, &server_cpu) != 2) {
            fprintf(stderr, "usage: %s [--cpu C,S] [round_trips]\n", argv[0]);
            return 2;
        }
        argi += 2;
    }
    long trips = argi < argc ? atol(argv[argi]) : 20000;
    if (trips < 100) trips = 100;

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0) die("socket");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1) < 0) die("bind/listen");
    socklen_t len = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &len);

    static char page[4096];
    static char bulk[1 << 20];
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        pin(server_cpu);
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) die("accept");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char req[24];
        for (long i = 0; i < trips; i++) {
            full(fd, req, sizeof req, 0);
            full(fd, page, sizeof page, 1);
        }
        /* Bulk: receive 1 GiB. */
        for (int i = 0; i < 1024; i++) full(fd, bulk, sizeof bulk, 0);
        full(fd, req, 1, 1);
        _exit(0);
    }
    pin(client_cpu);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint64_t *lat = malloc(sizeof(uint64_t) * (size_t)trips);
    char req[24] = {0};
    for (long i = 0; i < trips; i++) {
        uint64_t t0 = now_ns();
        full(fd, req, sizeof req, 1);
        full(fd, page, sizeof page, 0);
        lat[i] = now_ns() - t0;
    }
    uint64_t t0 = now_ns();
    for (int i = 0; i < 1024; i++) full(fd, bulk, sizeof bulk, 1);
    full(fd, req, 1, 0);
    double seconds = (double)(now_ns() - t0) / 1e9;
    int status;
    waitpid(child, &status, 0);
    qsort(lat, (size_t)trips, sizeof *lat, cmp);
    const char *name = client_cpu < 0 ? "tcp_floor" : client_cpu == server_cpu ? "tcp_floor_same_cpu" : "tcp_floor_cross_cpu";
    printf("{\"name\":\"%s\",\"round_trips\":%ld,\"rtt_p50_us\":%.2f,\"rtt_p99_us\":%.2f,\"bulk_gbps\":%.3f}\n", name, trips,
           (double)lat[trips / 2] / 1000.0, (double)lat[trips * 99 / 100] / 1000.0, (double)(1u << 30) / seconds / 1e9);
    return 0;
}
