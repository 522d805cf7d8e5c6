/* fp_kernel.c — thin, errno-returning wrappers over the kernel calls Farpage uses. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fp_kernel.h"
#include "fp_linux/userfaultfd.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define FP_RET(expr)                                                                               \
    do {                                                                                           \
        int fp_r_;                                                                                 \
        do {                                                                                       \
            fp_r_ = (expr);                                                                        \
        } while (fp_r_ < 0 && errno == EINTR);                                                     \
        return fp_r_ < 0 ? -errno : fp_r_;                                                         \
    } while (0)

/* ---- userfaultfd -------------------------------------------------------- */

int fp_uffd_open(int allow_user_mode_only, int *via) {
    int dev_err = 0;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        int e = errno;
        close(dev);
        if (fd >= 0) {
            if (via) *via = FP_UFFD_VIA_DEVICE;
            return fd;
        }
        dev_err = e;
    } else if (errno != ENOENT) {
        dev_err = errno;
    }
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) {
        if (via) *via = FP_UFFD_VIA_SYSCALL;
        return fd;
    }
    int sys_err = errno;
    if (allow_user_mode_only && sys_err == EPERM) {
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd >= 0) {
            if (via) *via = FP_UFFD_VIA_USER_MODE_ONLY;
            return fd;
        }
        sys_err = errno;
    }
    /* The syscall's answer is the more telling one when seccomp or the sysctl
     * refused it (ENOSYS/EPERM); fall back to the device's otherwise. */
    if (sys_err == ENOSYS || dev_err == 0) return -sys_err;
    return -dev_err;
}

int fp_uffd_api(int fd, uint64_t requested, uint64_t *features, uint64_t *ioctls) {
    struct uffdio_api api = {.api = UFFD_API, .features = requested};
    if (ioctl(fd, UFFDIO_API, &api) < 0) return -errno;
    if (features) *features = api.features;
    if (ioctls) *ioctls = api.ioctls;
    return 0;
}

int fp_uffd_probe(uint64_t *features, uint64_t *ioctls, int *via) {
    int fd = fp_uffd_open(1, via);
    if (fd < 0) return fd;
    int r = fp_uffd_api(fd, 0, features, ioctls);
    close(fd);
    return r;
}

int fp_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls) {
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) return -errno;
    if (ioctls) *ioctls = reg.ioctls;
    return 0;
}

int fp_uffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    FP_RET(ioctl(fd, UFFDIO_UNREGISTER, &r));
}

int64_t fp_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int *err) {
    uint64_t done = 0;
    if (err) *err = 0;
    while (done < len) {
        struct uffdio_copy c = {.dst = dst + done, .src = (uint64_t)(uintptr_t)src + done, .len = len - done, .mode = mode};
        if (ioctl(fd, UFFDIO_COPY, &c) == 0) return (int64_t)len;
        int e = errno;
        if (c.copy > 0) done += (uint64_t)c.copy;
        /* EAGAIN: the mm changed under us (or a partial copy); retry the rest. */
        if (e == EAGAIN || e == EINTR) continue;
        if (done > 0) {
            if (err) *err = e;
            return (int64_t)done;
        }
        return -e;
    }
    return (int64_t)done;
}

int64_t fp_uffd_zeropage(int fd, uint64_t start, uint64_t len, int dontwake) {
    for (;;) {
        struct uffdio_zeropage z = {.range = {.start = start, .len = len},
                                    .mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0};
        if (ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0) return z.zeropage;
        if (errno == EAGAIN || errno == EINTR) {
            if (z.zeropage > 0) {
                start += (uint64_t)z.zeropage;
                len -= (uint64_t)z.zeropage;
            }
            continue;
        }
        return -errno;
    }
}

int fp_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_writeprotect w = {.range = {.start = start, .len = len}, .mode = mode};
    int r;
    do {
        r = ioctl(fd, UFFDIO_WRITEPROTECT, &w);
    } while (r < 0 && (errno == EINTR || errno == EAGAIN));
    return r < 0 ? -errno : 0;
}

int fp_uffd_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    FP_RET(ioctl(fd, UFFDIO_WAKE, &r));
}

int64_t fp_uffd_poison(int fd, uint64_t start, uint64_t len, int dontwake) {
    for (;;) {
        struct uffdio_poison p = {.range = {.start = start, .len = len},
                                  .mode = dontwake ? UFFDIO_POISON_MODE_DONTWAKE : 0};
        if (ioctl(fd, UFFDIO_POISON, &p) == 0) return p.updated;
        if (errno == EAGAIN || errno == EINTR) continue;
        return -errno;
    }
}

int32_t fp_gettid(void) { return (int32_t)syscall(SYS_gettid); }

int fp_signal_sigbus(int32_t pid, uint32_t tid) {
    if (pid <= 0) return -ESRCH;
    if (tid != 0 && syscall(SYS_tgkill, (pid_t)pid, (pid_t)tid, SIGBUS) == 0) return 1;
    /* No thread id, or it names no thread of this process (gone, or counted in another pid
     * namespace): the process. */
    return kill((pid_t)pid, SIGBUS) == 0 ? 0 : -errno;
}

int fp_uffd_read_events(int fd, fp_uffd_event *out, int max) {
    struct uffd_msg msgs[64];
    if (max > 64) max = 64;
    ssize_t n;
    do {
        n = read(fd, msgs, sizeof(struct uffd_msg) * (size_t)max);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN ? 0 : -errno;
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < count; i++) {
        memset(&out[i], 0, sizeof(out[i]));
        out[i].kind = msgs[i].event;
        switch (msgs[i].event) {
        case UFFD_EVENT_PAGEFAULT:
            out[i].flags = msgs[i].arg.pagefault.flags;
            out[i].address = msgs[i].arg.pagefault.address;
            out[i].ptid = msgs[i].arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_FORK:
            out[i].arg0 = msgs[i].arg.fork.ufd;
            break;
        case UFFD_EVENT_REMAP:
            out[i].arg0 = msgs[i].arg.remap.from;
            out[i].arg1 = msgs[i].arg.remap.to;
            out[i].arg2 = msgs[i].arg.remap.len;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            out[i].arg0 = msgs[i].arg.remove.start;
            out[i].arg1 = msgs[i].arg.remove.end;
            break;
        default:
            break;
        }
    }
    return count;
}

/* ---- memfd and files ---------------------------------------------------- */

int fp_memfd_create(const char *name, int allow_sealing) {
    FP_RET(memfd_create(name, MFD_CLOEXEC | (allow_sealing ? MFD_ALLOW_SEALING : 0)));
}

int fp_ftruncate(int fd, uint64_t size) { FP_RET(ftruncate(fd, (off_t)size)); }

int fp_add_seals(int fd, int seals) { FP_RET(fcntl(fd, F_ADD_SEALS, seals)); }

int fp_get_seals(int fd) { FP_RET(fcntl(fd, F_GET_SEALS)); }

int fp_file_size(int fd, uint64_t *size) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    *size = (uint64_t)st.st_size;
    return 0;
}

int fp_file_identity(int fd, uint64_t *dev, uint64_t *ino) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    *dev = (uint64_t)st.st_dev;
    *ino = (uint64_t)st.st_ino;
    return 0;
}

int fp_punch_hole(int fd, uint64_t offset, uint64_t len) {
    FP_RET(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len));
}

int fp_file_open_rw(const char *path) { FP_RET(open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600)); }

int fp_set_direct_io(int fd, int on) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -errno;
    FP_RET(fcntl(fd, F_SETFL, on ? (flags | O_DIRECT) : (flags & ~O_DIRECT)));
}

int fp_flock_exclusive(int fd) { FP_RET(flock(fd, LOCK_EX | LOCK_NB)); }

int fp_preallocate(int fd, uint64_t len) { FP_RET(fallocate(fd, 0, 0, (off_t)len)); }

int fp_file_status(int fd, uint64_t *size, uint64_t *allocated, int *regular) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    *size = (uint64_t)st.st_size;
    *allocated = (uint64_t)st.st_blocks * 512;
    *regular = S_ISREG(st.st_mode) ? 1 : 0;
    return 0;
}

int fp_fs_space(int fd, uint64_t *available, uint64_t *total, uint64_t *fs_type) {
    struct statfs st;
    int rc;
    do {
        rc = fstatfs(fd, &st);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    uint64_t unit = st.f_frsize ? (uint64_t)st.f_frsize : (uint64_t)st.f_bsize;
    *available = (uint64_t)st.f_bavail * unit;
    *total = (uint64_t)st.f_blocks * unit;
    *fs_type = (uint64_t)st.f_type;
    return 0;
}

int64_t fp_pread_full(int fd, void *buf, uint64_t len, uint64_t offset) {
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

int fp_fd_link(int fd, char *buf, size_t cap) {
    char path[64];
    if (cap == 0) return -EINVAL;
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, buf, cap - 1);
    if (n < 0) return -errno;
    buf[n] = 0;
    return (int)n;
}

int fp_close(int fd) { return close(fd) < 0 ? -errno : 0; }

int fp_dup_cloexec(int fd) { FP_RET(fcntl(fd, F_DUPFD_CLOEXEC, 3)); }

void *fp_map_shared(int fd, uint64_t len, int *err) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        if (err) *err = errno;
        return NULL;
    }
    return p;
}

void *fp_map_anonymous(uint64_t len, int *err) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        if (err) *err = errno;
        return NULL;
    }
    return p;
}

int fp_unmap(void *addr, uint64_t len) { return munmap(addr, len) < 0 ? -errno : 0; }

int fp_madvise_dontfork(void *addr, uint64_t len) { return madvise(addr, len, MADV_DONTFORK) < 0 ? -errno : 0; }

/* ---- Unix sockets with SCM_RIGHTS --------------------------------------- */

static int fp_fill_addr(struct sockaddr_un *sa, const char *path) {
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa->sun_path)) return -ENAMETOOLONG;
    strcpy(sa->sun_path, path);
    return 0;
}

int fp_unix_listen(const char *path, int backlog, unsigned mode) {
    struct sockaddr_un sa;
    int r = fp_fill_addr(&sa, path);
    if (r < 0) return r;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -errno;
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        /* Replace a stale socket, never a live one: another agent may be serving it. */
        int probe = fp_unix_connect(path);
        if (probe >= 0) {
            close(probe);
            close(fd);
            return -EADDRINUSE;
        }
        unlink(path);
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || chmod(path, mode) < 0 || listen(fd, backlog) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int fp_unix_connect(const char *path) {
    struct sockaddr_un sa;
    int r = fp_fill_addr(&sa, path);
    if (r < 0) return r;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int c;
    do {
        c = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    } while (c < 0 && errno == EINTR);
    if (c < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int fp_accept(int listen_fd) { FP_RET(accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)); }

int64_t fp_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > 8) return -EINVAL;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 8)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&u, 0, sizeof(u));
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int64_t fp_recv_fds(int sock, void *buf, size_t cap, int *fds, int maxfds, int *nfds, int *truncated) {
    struct iovec iov = {.iov_base = buf, .iov_len = cap};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 16)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};
    *nfds = 0;
    *truncated = 0;
    ssize_t n;
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *in = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < maxfds) {
                fds[(*nfds)++] = in[i];
            } else {
                close(in[i]); /* never leak descriptors a peer forced on us */
                *truncated = 1;
            }
        }
    }
    return n;
}

int fp_peer_cred(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -errno;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int fp_set_nonblocking(int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return -errno;
    fl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
    return fcntl(fd, F_SETFL, fl) < 0 ? -errno : 0;
}

int fp_set_recv_timeout_ms(int fd, int ms) {
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ? -errno : 0;
}

/* ---- TCP ---------------------------------------------------------------- */

int fp_tcp_connect(const char *host, int port, int timeout_ms, int io_timeout_ms) {
    char service[16];
    snprintf(service, sizeof(service), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, service, &hints, &res);
    if (g != 0) return g == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
    int last = -ECONNREFUSED;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            last = -errno;
            continue;
        }
        int r = connect(fd, a->ai_addr, a->ai_addrlen);
        if (r < 0 && errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int n;
            do {
                n = poll(&p, 1, timeout_ms);
            } while (n < 0 && errno == EINTR);
            if (n == 0) {
                close(fd);
                last = -ETIMEDOUT;
                continue;
            }
            int soerr = 0;
            socklen_t len = sizeof(soerr);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
            r = soerr ? -1 : 0;
            errno = soerr;
        }
        if (r < 0) {
            last = -errno;
            close(fd);
            continue;
        }
        fp_set_nonblocking(fd, 0);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct timeval tv = {.tv_sec = io_timeout_ms / 1000, .tv_usec = (io_timeout_ms % 1000) * 1000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        freeaddrinfo(res);
        return fd;
    }
    freeaddrinfo(res);
    return last;
}

int fp_send_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int fp_send_two(int fd, const void *a, size_t alen, const void *b, size_t blen) {
    struct iovec iov[2] = {{(void *)a, alen}, {(void *)b, blen}};
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    while (iov[0].iov_len + iov[1].iov_len > 0) {
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        for (int i = 0; i < 2 && n > 0; i++) {
            size_t take = (size_t)n < iov[i].iov_len ? (size_t)n : iov[i].iov_len;
            iov[i].iov_base = (char *)iov[i].iov_base + take;
            iov[i].iov_len -= take;
            n -= (ssize_t)take;
        }
        if (iov[0].iov_len == 0) {
            msg.msg_iov = &iov[1];
            msg.msg_iovlen = 1;
        }
    }
    return 0;
}

int fp_recv_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return -ECONNRESET;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int fp_recv_all_spin(int fd, void *buf, size_t len, int spin_us) {
    char *p = buf;
    uint64_t deadline = fp_monotonic_ns() + (uint64_t)spin_us * 1000u;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n == 0) return -ECONNRESET;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
        if (fp_monotonic_ns() >= deadline) return fp_recv_all(fd, p, len);
    }
    return 0;
}

int fp_shutdown(int fd) { return shutdown(fd, SHUT_RDWR) < 0 ? -errno : 0; }

/* ---- processes, polling, notification ---------------------------------- */

int fp_pidfd_open(int32_t pid) { FP_RET((int)syscall(SYS_pidfd_open, (pid_t)pid, 0)); }

int fp_epoll_create(void) { FP_RET(epoll_create1(EPOLL_CLOEXEC)); }

int fp_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {.events = events, .data = {.u64 = data}};
    int kop = op == 1 ? EPOLL_CTL_ADD : op == 2 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    FP_RET(epoll_ctl(epfd, kop, fd, &ev));
}

int fp_epoll_wait(int epfd, fp_poll_event *out, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) {
        out[i].events = evs[i].events;
        out[i].data = evs[i].data.u64;
    }
    return n;
}

int fp_eventfd(void) { FP_RET(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

int fp_eventfd_signal(int fd) {
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof(one));
    return (n < 0 && errno != EAGAIN) ? -errno : 0;
}

int fp_eventfd_drain(int fd) {
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof(v));
    return (n < 0 && errno != EAGAIN) ? -errno : 0;
}

int fp_sd_notify(const char *state) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path) return 0;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    size_t plen = strlen(path);
    if (plen >= sizeof(sa.sun_path)) return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, plen);
    if (sa.sun_path[0] == '@') sa.sun_path[0] = 0; /* abstract namespace */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    ssize_t n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa,
                       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen));
    int e = errno;
    close(fd);
    return n < 0 ? -e : 1;
}

void fp_malloc_tune(size_t mmap_threshold, size_t trim_threshold, int max_arenas) {
    mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold);
    mallopt(M_TRIM_THRESHOLD, (int)trim_threshold);
    if (max_arenas > 0) mallopt(M_ARENA_MAX, max_arenas);
}

int fp_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, 15);
    buf[15] = 0;
    return -pthread_setname_np(pthread_self(), buf);
}

uint64_t fp_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int fp_page_size(void) { return (int)sysconf(_SC_PAGESIZE); }
