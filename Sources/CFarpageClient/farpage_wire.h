/* farpage_wire.h — the agent control protocol, version 1 (see docs/protocol.md).
 * The Swift side is Sources/FarpageProtocol/Wire.swift; a test checks they agree.
 * All integers little-endian; one message per SOCK_SEQPACKET packet. */
#ifndef FARPAGE_WIRE_H
#define FARPAGE_WIRE_H
#include <stdint.h>

#define FPW_MAGIC 0x31475046u /* "FPG1" */
#define FPW_VERSION 1
#define FPW_MAX_MESSAGE 65536

enum {
    FPW_REGISTER = 1,     /* body fpw_register; fds: memfd, uffd */
    FPW_UNREGISTER = 2,   /* body u64 region_id */
    FPW_ADVISE = 3,       /* body fpw_advise */
    FPW_STATS = 4,        /* body u64 region_id (0 = whole agent) */
    FPW_STATUS_JSON = 5,  /* empty body; reply JSON */
    FPW_REGIONS_JSON = 6, /* empty body; reply JSON */
    FPW_PING = 7,         /* empty body; reply OK */
    FPW_POOL_ATTACH = 8,  /* body: "HOST:PORT"; reply OK (operators, via farpagectl) */
    FPW_POOL_DETACH = 9,  /* body: "HOST:PORT"; reply OK once draining started */
    FPW_POOL_JSON = 10,   /* empty body; reply JSON */
    FPW_POOL_REMOVE = 11, /* body: "HOST:PORT"; drop without draining (its pages are lost) */
    FPW_REGISTER_VIEW = 12, /* body fpw_register_view; fds: the region's memfd, a uffd; reply OK(view id) */
    FPW_FORK_PREPARE = 13,  /* empty body; reply OK: regions released soon after stay viewable a while */
    FPW_OK = 0x81,        /* body fpw_ok */
    FPW_ERROR = 0x82,     /* body fpw_error + message text */
    FPW_STATS_REPLY = 0x83, /* body u32 count, u32 pad, count x u64 */
    FPW_JSON = 0x84,      /* body u32 flags (1 = more follows), u32 pad, text */
};

struct fpw_header {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint32_t length; /* whole message, header included */
    uint32_t request_id;
};

struct fpw_register {
    uint64_t address;
    uint64_t length;
    uint32_t page_size;
    uint32_t flags;
    uint64_t resident_budget;
    uint64_t uffd_features;
    char name[24];
};

struct fpw_advise {
    uint64_t region_id;
    uint64_t offset;
    uint64_t length;
    uint32_t hint;
    uint32_t reserved;
};

/* A forked child's private view of a region of its parent (same address and length). */
struct fpw_register_view {
    uint64_t region_id;
    uint64_t address;
    uint64_t length;
};

struct fpw_ok {
    uint64_t value;
    uint64_t value2;
};

struct fpw_error {
    int32_t err; /* errno value */
    uint32_t code;
};

_Static_assert(sizeof(struct fpw_header) == 16, "wire header");
_Static_assert(sizeof(struct fpw_register) == 64, "wire register");
_Static_assert(sizeof(struct fpw_advise) == 32, "wire advise");
_Static_assert(sizeof(struct fpw_register_view) == 24, "wire register view");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");
#endif
