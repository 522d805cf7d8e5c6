/* fork_exec.c — what fork-then-exec costs a program that holds far memory.
 *
 *   fork_exec [--regions N] [--region-mib M] [--rounds R] [--label NAME]
 *
 * Allocates N blocks of M MiB (far memory under LD_PRELOAD=libfarpage.so), writes them,
 * then times R rounds of fork + exec("/bin/true") + wait. Prints one JSON line: median and
 * p90 microseconds per round. Run it plainly and under the shim: the ratio is the shim's
 * cost (each forked child maps a private view of every region and registers it with the
 * agent before fork returns). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int regions = 4, rounds = 200;
    size_t mib = 64;
    const char *label = "fork_exec";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--regions") && i + 1 < argc) regions = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--region-mib") && i + 1 < argc) mib = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--label") && i + 1 < argc) label = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--regions N] [--region-mib M] [--rounds R] [--label NAME]\n", argv[0]);
            return 2;
        }
    }
    if (regions < 0 || rounds < 1) return 2;
    char **blocks = calloc((size_t)regions + 1, sizeof(char *));
    for (int r = 0; r < regions; r++) {
        blocks[r] = malloc(mib << 20);
        if (!blocks[r]) {
            perror("malloc");
            return 1;
        }
        memset(blocks[r], r + 1, mib << 20);
    }
    double *t = calloc((size_t)rounds, sizeof(double));
    for (int i = 0; i < rounds; i++) {
        double t0 = now_us();
        pid_t child = fork();
        if (child < 0) {
            perror("fork");
            return 1;
        }
        if (child == 0) {
            execl("/bin/true", "true", (char *)NULL);
            _exit(127);
        }
        int status = 0;
        waitpid(child, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child failed (status 0x%x)\n", status);
            return 1;
        }
        t[i] = now_us() - t0;
    }
    for (int r = 0; r < regions; r++)
        if (blocks[r][(mib << 20) - 1] != (char)(r + 1)) {
            fprintf(stderr, "block %d changed\n", r);
            return 1;
        }
    qsort(t, (size_t)rounds, sizeof(double), cmp);
    printf("{\"name\":\"%s\",\"regions\":%d,\"region_mib\":%zu,\"rounds\":%d,\"p50_us\":%.1f,\"p90_us\":%.1f}\n", label,
           regions, mib, rounds, t[rounds / 2], t[rounds * 9 / 10]);
    return 0;
}
