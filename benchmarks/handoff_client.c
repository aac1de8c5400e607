/* The fd hand-off benchmark's client: one connection, as fast as it goes.
 *
 *   handoff_client ipcd STREAM_SOCKET MODE SECONDS DEPTH
 *   handoff_client raw  FD            MODE SECONDS DEPTH
 *
 * MODE "pairs": PUT an fd (one end of a pipe), then TAKE it back, one pair
 * at a time. MODE "gets": PUT it once, then GET duplicates, DEPTH requests
 * written at a time before their DEPTH answers are read (1: one at a time);
 * every fd received is closed at once. "ipcd" speaks the ipcd frame format
 * (docs/protocol.md) on the daemon's stream socket; "raw" speaks the
 * baseline holder's one-byte commands (P + fd, T, G; answers k [+ fd]) on an
 * inherited socketpair end. Prints one JSON object: operations done, the
 * seconds they took, fds received.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 64
#define CMSG_FDS 64

static int sock = -1;
static int ipcd = 0;
static long fds_received = 0;
static unsigned char inbuf[1 << 16];
static size_t have = 0;
static uint32_t next_id = 1;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "handoff_client: %s: %s\n", what, errno ? strerror(errno) : "protocol error");
    exit(69);
}

/* One sendmsg of LEN bytes, with FD attached if it is >= 0. */
static void send_bytes(const void *buf, size_t len, int fd) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    while (iov.iov_len > 0) {
        ssize_t k = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        iov.iov_base = (char *)iov.iov_base + k;
        iov.iov_len -= (size_t)k;
        msg.msg_control = NULL; /* the fd went with the first byte */
        msg.msg_controllen = 0;
    }
}

/* One recvmsg into the input buffer; every fd that comes is closed. */
static void receive(void) {
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(CMSG_FDS * sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = inbuf + have, .iov_len = sizeof inbuf - have};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    ssize_t k;
    do {
        k = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (k < 0 && errno == EINTR);
    if (k < 0) die("recv");
    if (k == 0) {
        errno = 0;
        die("the server closed the connection");
    }
    have += (size_t)k;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int fds[CMSG_FDS];
        memcpy(fds, CMSG_DATA(c), n * sizeof(int));
        for (size_t i = 0; i < n; i++) close(fds[i]);
        fds_received += (long)n;
    }
}

/* Consume one answer: an ipcd frame of op EXPECT, or one raw 'k' byte. */
static void answer(unsigned char expect) {
    if (!ipcd) {
        while (have < 1) receive();
        if (inbuf[0] != 'k') {
            errno = 0;
            die("the raw holder refused a command");
        }
        memmove(inbuf, inbuf + 1, --have);
        return;
    }
    while (have < 16) receive();
    uint32_t length = (uint32_t)inbuf[12] << 24 | (uint32_t)inbuf[13] << 16 | (uint32_t)inbuf[14] << 8 | inbuf[15];
    if (length > sizeof inbuf - 16) {
        errno = 0;
        die("reply too large");
    }
    while (have < 16 + length) receive();
    if (inbuf[3] != expect) {
        fprintf(stderr, "handoff_client: op 0x%02x answered 0x%02x: %.*s\n", expect & 0x7f, inbuf[3],
                (int)length, inbuf + 16);
        exit(69);
    }
    have -= 16 + length;
    memmove(inbuf, inbuf + 16 + length, have);
}

static const char NAME_BODY[] = "{\"name\":\"bench\"}";

/* Append one request to OUT; returns its length. */
static size_t request(unsigned char *out, unsigned char op, unsigned char nfds) {
    if (!ipcd) {
        out[0] = op == 0x20 ? 'P' : op == 0x22 ? 'T' : 'G';
        return 1;
    }
    uint32_t id = next_id++, length = sizeof NAME_BODY - 1;
    unsigned char header[16] = {'I', 'P', 1, op, 0, nfds, 0, 0,
                                (unsigned char)(id >> 24), (unsigned char)(id >> 16), (unsigned char)(id >> 8), (unsigned char)id,
                                (unsigned char)(length >> 24), (unsigned char)(length >> 16), (unsigned char)(length >> 8), (unsigned char)length};
    memcpy(out, header, 16);
    memcpy(out + 16, NAME_BODY, length);
    return 16 + length;
}

static void put(int fd) {
    unsigned char out[64];
    send_bytes(out, request(out, 0x20, 1), fd);
    answer(0xa0);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: handoff_client ipcd|raw SOCKET|FD pairs|gets SECONDS DEPTH\n");
        return 2;
    }
    ipcd = strcmp(argv[1], "ipcd") == 0;
    int gets = strcmp(argv[3], "gets") == 0;
    double seconds = atof(argv[4]);
    int depth = atoi(argv[5]);
    if (depth < 1 || depth > MAX_DEPTH) depth = 1;
    if (ipcd) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        strncpy(addr.sun_path, argv[2], sizeof addr.sun_path - 1);
        sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    } else {
        sock = atoi(argv[2]);
    }
    int pipe_fds[2];
    if (pipe(pipe_fds) < 0) die("pipe");
    int writer = pipe_fds[1];
    unsigned char out[MAX_DEPTH * 64];
    long ops = 0;
    if (gets) put(writer);
    double start = now(), deadline = start + seconds, end = start;
    while ((end = now()) < deadline) {
        for (int round = 0; round < 50; round++) {
            if (gets) {
                size_t len = 0;
                for (int i = 0; i < depth; i++) len += request(out + len, 0x21, 0);
                send_bytes(out, len, -1);
                for (int i = 0; i < depth; i++) answer(0xa1);
                ops += depth;
            } else {
                put(writer);
                send_bytes(out, request(out, 0x22, 0), -1);
                answer(0xa2);
                ops += 1;
            }
        }
    }
    if (gets) {
        send_bytes(out, request(out, 0x22, 0), -1); /* leave nothing stored */
        answer(0xa2);
    }
    printf("{\"ops\": %ld, \"seconds\": %.6f, \"fds\": %ld}\n", ops, end - start, fds_received);
    return 0;
}
