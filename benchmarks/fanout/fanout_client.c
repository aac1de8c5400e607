/* The fan-out benchmark's clients: subscribers and a publisher, for ipcd
 * rooms (the frame protocol of docs/protocol.md) and for Redis pub/sub (RESP
 * over the Unix socket). Compiled by benchmarks/fanout/clients.py with gcc.
 *
 *   fanout_client sub ipcd|redis SOCKET NAME CONNS LAG_FILE SLOT WARMUP DURATION
 *   fanout_client pub ipcd|redis SOCKET NAME SUBSCRIBERS LAG_FILE PROCS START_AT
 *                 WARMUP DURATION PACED WINDOW MAX_LAG PACED_RATE
 *
 * A subscriber process holds CONNS connections on one epoll set, checks that
 * each sees every message once and in order (ipcd: the room's seq; Redis:
 * the counter at the head of the text) and stores, in its 8-byte slot of
 * LAG_FILE, the lowest sequence number all its connections have reached.
 * It prints "ready" once subscribed, then reads two lines on stdin: the
 * publisher's start time (CLOCK_MONOTONIC seconds) and, at the end, how
 * many messages were published. The publisher keeps at most WINDOW
 * publishes unanswered and never runs MAX_LAG messages ahead of the
 * slowest slot. Both print one JSON object on stdout at the end.
 *
 * A payload is 32 bytes: "%010d %020d" % (seq, send time in ns) and a
 * marker, '.' (bulk) or 'L' (paced: the subscriber records its latency).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 32
#define BUF_SIZE (256 * 1024)
#define DRAIN_NS 5000000000LL
#define OP_PING 0x01
#define OP_PONG 0x81
#define OP_JOIN 0x11
#define OP_JOIN_REPLY 0x91
#define OP_SAY 0x13
#define OP_SAY_REPLY 0x93
#define OP_MESSAGE 0x40
#define OP_NOTICE 0x42
#define OP_ERROR 0xFF

static int redis;     /* the target: 1 Redis, 0 ipcd */
static char *name;    /* room or channel */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static double cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what) {
    /* the harness reads one JSON object; the reason goes in it */
    printf("{\"error\": \"%s: %s\"}\n", what, errno ? strerror(errno) : "unexpected answer");
    exit(0);
}

static int connect_to(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    struct timeval timeout = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    return fd;
}

static void send_all(int fd, const char *data, size_t n) {
    while (n) {
        ssize_t k = send(fd, data, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("send");
        data += k;
        n -= (size_t)k;
    }
}

static int64_t *map_lag(const char *path) {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    off_t size = fd < 0 ? -1 : lseek(fd, 0, SEEK_END);
    if (size <= 0) die("lag file");
    void *map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) die("mmap");
    close(fd);
    return map;
}

static uint32_t be32(const char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

static size_t ipcd_header(char *out, int op, uint32_t id, uint32_t length) {
    out[0] = 'I'; out[1] = 'P'; out[2] = 1; out[3] = (char)op;
    memset(out + 4, 0, 4);
    uint32_t v = htonl(id);
    memcpy(out + 8, &v, 4);
    v = htonl(length);
    memcpy(out + 12, &v, 4);
    return 16;
}

/* A frame's whole length if buf holds all of it, else 0. */
static size_t ipcd_frame(const char *buf, size_t n) {
    if (n < 16) return 0;
    size_t end = 16 + (size_t)be32(buf + 12);
    return end <= n ? end : 0;
}

/* --- subscribers ---------------------------------------------------------- */

struct sub {
    int fd;
    size_t len;      /* bytes held in buf */
    char *buf;
    int64_t next;    /* sequence number expected next */
    int64_t received, counted, gaps, backwards;
    char failed[160];
};

static int64_t number(const char *p, int width) {
    int64_t v = 0;
    for (int i = 0; i < width; i++) v = v * 10 + (p[i] - '0');
    return v;
}

static int64_t *latency;
static size_t latencies, latency_cap;

static void check(struct sub *s, int64_t seq, int counting) {
    if (seq == s->next) s->next++;
    else if (seq > s->next) { s->gaps += seq - s->next; s->next = seq + 1; }
    else s->backwards++;
    s->received++;
    s->counted += counting;
}

static void stamp(const char *payload, int64_t now) {
    if (payload[31] != 'L') return;
    if (latencies == latency_cap) {
        latency_cap = latency_cap ? 2 * latency_cap : 4096;
        latency = realloc(latency, latency_cap * sizeof *latency);
    }
    latency[latencies++] = now - number(payload + 11, 20);
}

static void fail(struct sub *s, const char *what, const char *data, size_t n) {
    size_t at = (size_t)snprintf(s->failed, sizeof s->failed, "%s", what);
    for (size_t i = 0; i < n && at + 5 < sizeof s->failed; i++) {
        unsigned char c = (unsigned char)data[i];  /* kept printable and JSON-safe */
        s->failed[at++] = c >= 0x20 && c < 0x7F && c != '"' && c != '\\' ? (char)c : '?';
    }
    s->failed[at] = 0;
}

/* Consume the whole frames (ipcd) or messages (Redis) in s->buf; returns
 * the bytes used. */
static size_t parse_ipcd(struct sub *s, int64_t now, int counting) {
    size_t pos = 0, end;
    while ((end = ipcd_frame(s->buf + pos, s->len - pos))) {
        char *f = s->buf + pos, *body = f + 16;
        size_t blen = end - 16;
        if (f[0] != 'I' || f[1] != 'P' || f[2] != 1) { fail(s, "not an ipcd frame: ", f, 16); return pos; }
        int op = (unsigned char)f[3];
        if (op == OP_MESSAGE) {
            char *seq = memmem(body, blen, "\"seq\":", 6);
            char *text = memmem(body, blen, "\"text\":\"", 8);
            if (!seq || !text || text + 8 + PAYLOAD > body + blen) { fail(s, "odd MESSAGE: ", body, blen); return pos; }
            check(s, strtoll(seq + 6, NULL, 10), counting);
            stamp(text + 8, now);
        } else if (op == OP_PING) {
            char pong[16];
            ipcd_header(pong, OP_PONG, be32(f + 8), (uint32_t)blen);
            send_all(s->fd, pong, 16);
            send_all(s->fd, body, blen);
        } else if (op == OP_ERROR) {
            fail(s, "cut off: ", body + 2, blen > 2 ? blen - 2 : 0);
            return pos;
        } else if (op != OP_NOTICE) {
            fail(s, "unexpected frame: ", f, 16);
            return pos;
        }
        pos += end;
    }
    return pos;
}

static char redis_prefix[128];
static size_t redis_prefix_len;

static size_t parse_redis(struct sub *s, int64_t now, int counting) {
    size_t pos = 0, size = redis_prefix_len + PAYLOAD + 2;
    while (s->len - pos >= size) {
        char *m = s->buf + pos;
        if (memcmp(m, redis_prefix, redis_prefix_len)) { fail(s, "unexpected reply: ", m, 64); return pos; }
        check(s, number(m + redis_prefix_len, 10), counting);
        stamp(m + redis_prefix_len, now);
        pos += size;
    }
    return pos;
}

/* Read into s->buf until ``want`` (the subscription's answer) is at its
 * head; what follows it stays for the parser. */
static void subscribe(struct sub *s) {
    char out[512];
    if (redis) {
        int n = snprintf(out, sizeof out, "*2\r\n$9\r\nSUBSCRIBE\r\n$%zu\r\n%s\r\n", strlen(name), name);
        send_all(s->fd, out, (size_t)n);
        n = snprintf(out, sizeof out, "*3\r\n$9\r\nsubscribe\r\n$%zu\r\n%s\r\n:1\r\n", strlen(name), name);
        while (s->len < (size_t)n) {
            ssize_t k = recv(s->fd, s->buf + s->len, BUF_SIZE - s->len, 0);
            if (k <= 0) die("SUBSCRIBE");
            s->len += (size_t)k;
        }
        if (memcmp(s->buf, out, (size_t)n)) { errno = 0; die("SUBSCRIBE"); }
        memmove(s->buf, s->buf + n, s->len - (size_t)n);
        s->len -= (size_t)n;
        return;
    }
    int n = snprintf(out + 16, sizeof out - 16, "{\"room\":\"%s\"}", name);
    ipcd_header(out, OP_JOIN, 1, (uint32_t)n);
    send_all(s->fd, out, 16 + (size_t)n);
    for (;;) {
        size_t end;
        while ((end = ipcd_frame(s->buf, s->len))) {
            int op = (unsigned char)s->buf[3];
            memmove(s->buf, s->buf + end, s->len - end);
            s->len -= end;
            if (op == OP_JOIN_REPLY) return;
            if (op == OP_ERROR) { errno = 0; die("JOIN refused"); }
        }  /* else a NOTICE of someone else's join */
        ssize_t k = recv(s->fd, s->buf + s->len, BUF_SIZE - s->len, 0);
        if (k <= 0) die("JOIN");
        s->len += (size_t)k;
    }
}

static int sub_main(char **argv) {
    int conns = atoi(argv[5]), slot = atoi(argv[7]);
    int64_t *lag = map_lag(argv[6]);
    int64_t warmup = (int64_t)(atof(argv[8]) * 1e9), duration = (int64_t)(atof(argv[9]) * 1e9);
    redis_prefix_len = (size_t)snprintf(redis_prefix, sizeof redis_prefix,
                                        "*3\r\n$7\r\nmessage\r\n$%zu\r\n%s\r\n$%d\r\n", strlen(name), name, PAYLOAD);
    struct sub *subs = calloc((size_t)conns, sizeof *subs);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < conns; i++) {
        struct sub *s = &subs[i];
        s->fd = connect_to(argv[3]);
        s->buf = malloc(BUF_SIZE);
        s->next = 1;
        subscribe(s);
        fcntl(s->fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    printf("ready\n");
    fflush(stdout);

    int64_t t_from = INT64_MAX, t_to = INT64_MAX, total = -1, deadline = 0;
    double cpu[2];
    int edges = 0, live = conns;
    char line[256];
    size_t line_len = 0;
    struct epoll_event events[128];
    for (;;) {
        int n = epoll_wait(ep, events, 128, 50);
        int64_t now = now_ns();
        int counting = t_from <= now && now < t_to;
        if (edges < 2 && now >= (edges ? t_to : t_from)) cpu[edges++] = cpu_s();
        for (int e = 0; e < n; e++) {
            struct sub *s = events[e].data.ptr;
            if (!s) {  /* stdin: the start time, then how many were published */
                ssize_t k = read(0, line + line_len, sizeof line - 1 - line_len);
                if (k <= 0) {
                    if (total < 0) { errno = 0; die("the harness went away"); }
                    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
                    continue;
                }
                line_len += (size_t)k;
                char *nl;
                while ((nl = memchr(line, '\n', line_len))) {
                    *nl = 0;
                    if (t_from == INT64_MAX) {
                        t_from = (int64_t)(atof(line) * 1e9) + warmup;
                        t_to = t_from + duration;
                    } else {
                        total = atoll(line);
                        deadline = now + DRAIN_NS;
                    }
                    line_len -= (size_t)(nl + 1 - line);
                    memmove(line, nl + 1, line_len);
                }
                continue;
            }
            ssize_t k = recv(s->fd, s->buf + s->len, BUF_SIZE - s->len, 0);
            if (k < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (k < 0) {
                snprintf(s->failed, sizeof s->failed, "recv failed: %s", strerror(errno));
            } else if (k == 0) {
                snprintf(s->failed, sizeof s->failed, "the server closed it after %lld messages",
                         (long long)s->received);
            } else {
                s->len += (size_t)k;
                size_t used = redis ? parse_redis(s, now, counting) : parse_ipcd(s, now, counting);
                memmove(s->buf, s->buf + used, s->len - used);
                s->len -= used;
                if (!s->failed[0] && s->len == BUF_SIZE) fail(s, "a frame larger than the buffer", "", 0);
            }
            if (s->failed[0]) {
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                live--;
            }
        }
        int64_t reached = INT64_MAX;
        for (int i = 0; i < conns; i++)
            if (!subs[i].failed[0] && subs[i].next - 1 < reached) reached = subs[i].next - 1;
        __atomic_store_n(&lag[slot], live ? reached : INT64_MAX, __ATOMIC_RELAXED);
        if (total >= 0 && (reached >= total || now > deadline)) break;
    }
    int64_t counted = 0, received = 0, gaps = 0, backwards = 0, shorts = 0, missing = 0;
    for (int i = 0; i < conns; i++) {
        struct sub *s = &subs[i];
        counted += s->counted; received += s->received; gaps += s->gaps; backwards += s->backwards;
        if (s->next <= total) { shorts++; missing += total - (s->next - 1); }
        close(s->fd);
    }
    printf("{\"counted\": %lld, \"received\": %lld, \"gaps\": %lld, \"backwards\": %lld, "
           "\"short\": %lld, \"missing\": %lld, \"cpu\": %.6f, \"failed\": [",
           (long long)counted, (long long)received, (long long)gaps, (long long)backwards,
           (long long)shorts, (long long)missing, edges == 2 ? cpu[1] - cpu[0] : 0.0);
    for (int i = 0, shown = 0; i < conns && shown < 3; i++)
        if (subs[i].failed[0]) printf("%s\"%s\"", shown++ ? ", " : "", subs[i].failed);
    printf("], \"latency_ns\": [");
    for (size_t i = 0; i < latencies; i++) printf("%s%lld", i ? "," : "", (long long)latency[i]);
    printf("]}\n");
    return 0;
}

/* --- the publisher -------------------------------------------------------- */

static int pub_fd;
static int64_t sent, answered;
static char answers[BUF_SIZE];
static size_t answers_len;
static char reply[32];  /* Redis: PUBLISH's answer, the number of receivers */
static size_t reply_len;

static char template[512];  /* one whole message; encode() fills in its numbers */
static size_t template_len, text_at;

static void digits(char *out, int width, uint64_t v) {
    for (int i = width - 1; i >= 0; i--, v /= 10) out[i] = (char)('0' + v % 10);
}

static void build_template(void) {
    char text[PAYLOAD + 1];
    memset(text, '0', PAYLOAD);
    text[PAYLOAD] = 0;
    if (redis) {
        template_len = (size_t)sprintf(template, "*3\r\n$7\r\nPUBLISH\r\n$%zu\r\n%s\r\n$%d\r\n%s\r\n",
                                       strlen(name), name, PAYLOAD, text);
        text_at = template_len - 2 - PAYLOAD;
        return;
    }
    int n = sprintf(template + 16, "{\"room\":\"%s\",\"text\":\"%s\"}", name, text);
    template_len = ipcd_header(template, OP_SAY, 0, (uint32_t)n) + (size_t)n;
    text_at = template_len - 2 - PAYLOAD;
}

static size_t encode(char *out, int64_t seq, char marker) {
    memcpy(out, template, template_len);
    char *text = out + text_at;
    digits(text, 10, (uint64_t)seq);
    text[10] = ' ';
    digits(text + 11, 20, (uint64_t)now_ns());
    text[31] = marker;
    if (!redis) {
        uint32_t id = htonl((uint32_t)seq);
        memcpy(out + 8, &id, 4);
    }
    return template_len;
}

/* Wait for at least one more answer and count the whole ones. */
static void collect(void) {
    ssize_t k = recv(pub_fd, answers + answers_len, sizeof answers - answers_len, 0);
    if (k == 0) errno = 0;
    if (k <= 0) die("the server closed the publisher or did not answer");
    answers_len += (size_t)k;
    size_t pos = 0, end;
    if (redis) {
        for (; answers_len - pos >= reply_len; pos += reply_len, answered++)
            if (memcmp(answers + pos, reply, reply_len)) { errno = 0; die("PUBLISH answered other than the receivers"); }
    } else {
        for (; (end = ipcd_frame(answers + pos, answers_len - pos)); pos += end, answered++)
            if ((unsigned char)answers[pos + 3] != OP_SAY_REPLY) { errno = 0; die("SAY refused"); }
    }
    memmove(answers, answers + pos, answers_len - pos);
    answers_len -= pos;
}

static int64_t slowest(const int64_t *lag, int procs) {
    int64_t low = INT64_MAX;
    for (int i = 0; i < procs; i++) {
        int64_t r = __atomic_load_n(&lag[i], __ATOMIC_RELAXED);
        if (r < low) low = r;
    }
    return low;
}

static void sleep_until(int64_t t) {
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

static int pub_main(char **argv) {
    int subscribers = atoi(argv[5]), procs = atoi(argv[7]);
    int64_t *lag = map_lag(argv[6]);
    int64_t start = (int64_t)(atof(argv[8]) * 1e9);
    int64_t w0 = start + (int64_t)(atof(argv[9]) * 1e9), duration = (int64_t)(atof(argv[10]) * 1e9);
    int64_t w1 = w0 + duration;
    double paced = atof(argv[11]);
    int64_t window = atoll(argv[12]), max_lag = atoll(argv[13]), rate = atoll(argv[14]);
    reply_len = (size_t)snprintf(reply, sizeof reply, ":%d\r\n", subscribers);
    pub_fd = connect_to(argv[3]);
    build_template();
    char *out = malloc((size_t)window * 256);
    sleep_until(start);
    double cpu0 = 0, cpu1 = 0;
    int64_t first = -1, held = 0, now;
    while ((now = now_ns()) < w1) {
        if (first < 0 && now >= w0) { cpu0 = cpu_s(); first = sent; }
        int64_t room = window - (sent - answered), ahead = max_lag - (sent - slowest(lag, procs));
        if (ahead < room) room = ahead;
        if (room > 0) {
            size_t n = 0;
            for (int64_t i = 0; i < room; i++) n += encode(out + n, ++sent, '.');
            send_all(pub_fd, out, n);
        }
        if (sent > answered) {
            collect();
        } else {
            usleep(200);  /* the subscribers are behind */
            if (first >= 0) held += now_ns() - now;
        }
    }
    cpu1 = cpu_s();
    int64_t in_window = first < 0 ? 0 : sent - first;
    while (answered < sent) collect();
    int64_t deadline = now_ns() + DRAIN_NS;
    while (slowest(lag, procs) < sent && now_ns() < deadline) usleep(1000);
    int64_t paced_from = now_ns();
    for (int64_t i = 0; i < (int64_t)(paced * (double)rate); i++) {
        sleep_until(paced_from + i * 1000000000LL / rate);
        send_all(pub_fd, out, encode(out, ++sent, 'L'));
        while (answered < sent) collect();
    }
    close(pub_fd);
    double seconds = (double)duration / 1e9;
    printf("{\"published\": %lld, \"rate\": %.3f, \"cpu\": %.6f, \"held\": %.6f}\n", (long long)sent,
           (double)in_window / seconds, (cpu1 - cpu0) / seconds, (double)held / 1e9 / seconds);
    return 0;
}

int main(int argc, char **argv) {
    int sub = argc == 10 && !strcmp(argv[1], "sub"), pub = argc == 15 && !strcmp(argv[1], "pub");
    if (!(sub || pub) || (strcmp(argv[2], "ipcd") && strcmp(argv[2], "redis"))) {
        fprintf(stderr, "usage: fanout_client sub|pub ipcd|redis SOCKET NAME ... (see the head of the source)\n");
        return 2;
    }
    redis = !strcmp(argv[2], "redis");
    name = argv[4];
    return sub ? sub_main(argv) : pub_main(argv);
}
