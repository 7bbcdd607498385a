/*
 * loadgen: the load side of the konnect-relay benchmark.
 *
 * One single-threaded epoll program with four modes, so that the load is never
 * the bottleneck of what it measures, and a fifth, a reference relay:
 *
 *   loadgen sink  [--port P] [--lifetime S]
 *       The destination. Listens on 127.0.0.1:P (0 = any), prints {"port": P}
 *       and serves until stdin closes, SIGTERM, or the lifetime ends. Each
 *       connection opens with a command byte (sink protocol below).
 *
 *   loadgen bulk  --to H:P [--connect NAME:PORT] --dir up|down --tunnels N --bytes B
 *       N tunnels, each moving B bytes one way; prints bytes and seconds.
 *
 *   loadgen setup --to H:P [--connect NAME:PORT] --concurrency C --duration S [--max N]
 *       Closed loop: connect, CONNECT, wait for the 200, 64-byte request, 64-byte
 *       reply, close; C at a time for S seconds (or N tunnels); prints tunnels/s
 *       and latency percentiles.
 *
 *   loadgen idle  --to H:P [--connect NAME:PORT] --steps 1000,5000
 *       Opens tunnels up to each step, each verified end to end by a one-byte
 *       echo, prints a JSON line per step and waits for a line on stdin before
 *       the next step; closes everything after the last line.
 *
 *   loadgen refrelay --upstream H:P [--port P] [--lifetime S]
 *       A minimal CONNECT relay in C, the ceiling to compare relays with:
 *       reads the request head, dials the fixed upstream H:P (whatever the
 *       CONNECT names), answers 200 and splices bytes both ways. Prints
 *       {"port": P, "pid": N} and runs until stdin closes, like the sink.
 *
 * Without --connect the client talks to --to directly (the direct path);
 * with it, --to is an HTTP proxy and every tunnel starts with
 * "CONNECT NAME:PORT HTTP/1.1". --watch PID,... and --load-pid PID add the CPU
 * share of those processes over the measured interval (from /proc/PID/stat).
 *
 * Every tunnel opens the way Kong's does, with a TLS ClientHello record
 * (SNI = --sni, default bench.eu.cp0.konghq.com): a relay that checks the
 * hello sees a plausible one, and every target forwards the same bytes. The
 * sink skips that first record; no TLS follows, the rest is the sink protocol.
 *
 * Sink protocol (client -> sink, after the hello record):
 *   'U' u64be n   client sends n bytes; sink discards them, then answers the
 *                 8-byte count it received (so upload time is end to end
 *                 without relying on half-close, which proxies treat differently)
 *   'D' u64be n   sink sends n bytes
 *   'R' + 63 B    sink answers 64 bytes and closes
 *   'E'           sink echoes every later byte
 * After its part, the sink waits for the client to close, except after 'R':
 * there the sink closes first and the client closes once it sees the EOF, so
 * no TIME_WAIT state is left on ephemeral ports (a closed loop at >10k
 * tunnels/s exhausts loopback's 28k ports within seconds otherwise).
 *
 * Zero-copy where the kernel allows: senders use sendfile() from a memfd,
 * receivers discard with recv(MSG_TRUNC), which TCP honours without copying.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* Size of the memfd that senders sendfile() from, cycling through it. */
#define MEMFD_SIZE (4u << 20)
/* Largest CONNECT response head we accept: squid's and tinyproxy's are < 200 B. */
#define MAX_RESPONSE_HEAD 2048
/* Request and reply size of the setup figure ("one small request/response"). */
#define RR_SIZE 64
/* Bound on latency samples kept for percentiles (16 MB of doubles). */
#define MAX_SAMPLES (2u << 20)
/* Tunnels an idle run may hold: the 20,000-fd cap allows one proxy ~9,900. */
#define MAX_IDLE 20000
/* Establishments in flight while opening idle tunnels. */
#define IDLE_CONCURRENCY 256
/* A single tunnel that takes longer than this to set up counts as failed. */
#define TUNNEL_TIMEOUT_S 10.0
#define MAX_EVENTS 512
#define LISTEN_BACKLOG 4096

static int g_memfd = -1;
static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("{\"error\": \"");
    for (const char *p = msg; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        putchar(*p >= 0x20 ? *p : ' ');
    }
    printf("\"}\n");
    fflush(stdout);
    exit(1);
}

static void put_u64be(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

static uint64_t get_u64be(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static void make_memfd(void) {
    g_memfd = memfd_create("loadgen", 0);
    if (g_memfd < 0) die("memfd_create: %s", strerror(errno));
    unsigned char *buf = malloc(65536);
    if (!buf) die("malloc");
    for (unsigned i = 0; i < 65536; i++) buf[i] = (unsigned char)(i * 131u + 7u);
    for (unsigned off = 0; off < MEMFD_SIZE; off += 65536) {
        if (pwrite(g_memfd, buf, 65536, off) != 65536) die("memfd write: %s", strerror(errno));
    }
    free(buf);
}

/* sendfile() up to want bytes from the memfd, cycling; returns bytes sent or -1. */
static ssize_t send_from_memfd(int fd, off_t *off, uint64_t want) {
    size_t n = MEMFD_SIZE - (size_t)*off;
    if ((uint64_t)n > want) n = (size_t)want;
    ssize_t r = sendfile(fd, g_memfd, off, n);
    if (*off >= (off_t)MEMFD_SIZE) *off = 0;
    return r;
}

/* Discard up to want received bytes without copying them (tcp(7) MSG_TRUNC). */
static ssize_t discard(int fd, uint64_t want) {
    static char dummy[1];
    size_t n = want > (1u << 30) ? (1u << 30) : (size_t)want;
    return recv(fd, dummy, n, MSG_TRUNC | MSG_DONTWAIT);
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* A listening TCP socket on 127.0.0.1:port (0: any); *bound gets the port. */
static int listen_loopback(int port, int flags, int *bound) {
    int ls = socket(AF_INET, SOCK_STREAM | flags, 0);
    if (ls < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind: %s", strerror(errno));
    if (listen(ls, LISTEN_BACKLOG) < 0) die("listen: %s", strerror(errno));
    socklen_t sl = sizeof sa;
    getsockname(ls, (struct sockaddr *)&sa, &sl);
    *bound = ntohs(sa.sin_port);
    return ls;
}

static void parse_hostport(const char *s, struct sockaddr_in *sa) {
    char host[256];
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || (size_t)(colon - s) >= sizeof host) die("bad address %s", s);
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) die("bad IPv4 address %s", host);
}

/* ---------------------------------------------------------------- CPU watch */

#define MAX_WATCH 64
static int g_watch[MAX_WATCH];
static int g_nwatch = 0;
static int g_load_pid = 0;

static long long proc_ticks(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* comm may contain spaces: fields are counted after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    p += 2; /* field 3 (state) */
    unsigned long long ut = 0, st = 0;
    /* fields 3..13 skipped, then utime (14) and stime (15) */
    if (sscanf(p, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return 0;
    return (long long)(ut + st);
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* Busy and total jiffies per core from /proc/stat: unlike a process's
 * utime+stime this includes softirq time, where loopback TCP does much of
 * its work, so it tells which core was saturated. */
#define MAX_CORES 8
typedef struct {
    double t;
    long long proxy_ticks;
    long long load_ticks;
    double self_cpu;
    int ncores;
    long long busy[MAX_CORES];
    long long total[MAX_CORES];
} cpu_mark;

static void read_cores(cpu_mark *m) {
    m->ncores = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f) && m->ncores < MAX_CORES) {
        int id;
        unsigned long long v[8] = {0};
        if (strncmp(line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9') continue;
        if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &id, &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7]) != 9)
            continue;
        /* user nice system idle iowait irq softirq steal */
        long long idle = (long long)(v[3] + v[4]);
        long long total = 0;
        for (int i = 0; i < 8; i++) total += (long long)v[i];
        m->busy[m->ncores] = total - idle;
        m->total[m->ncores] = total;
        m->ncores++;
    }
    fclose(f);
}

static cpu_mark cpu_now(void) {
    cpu_mark m;
    m.t = now_s();
    m.proxy_ticks = 0;
    for (int i = 0; i < g_nwatch; i++) m.proxy_ticks += proc_ticks(g_watch[i]);
    m.load_ticks = g_load_pid ? proc_ticks(g_load_pid) : 0;
    m.self_cpu = self_cpu_s();
    read_cores(&m);
    return m;
}

/* Prints ", \"proxy_cpu\": x, \"load_cpu\": y" for the interval a..b. */
static void print_cpu(cpu_mark a, cpu_mark b) {
    double hz = (double)sysconf(_SC_CLK_TCK);
    double dt = b.t - a.t;
    if (dt <= 0) dt = 1e-9;
    if (g_nwatch)
        printf(", \"proxy_cpu\": %.4f", (double)(b.proxy_ticks - a.proxy_ticks) / hz / dt);
    else
        printf(", \"proxy_cpu\": null");
    double load = (b.self_cpu - a.self_cpu) + (double)(b.load_ticks - a.load_ticks) / hz;
    printf(", \"load_cpu\": %.4f, \"core_busy\": [", load / dt);
    for (int i = 0; i < a.ncores && i < b.ncores; i++) {
        long long tot = b.total[i] - a.total[i];
        printf("%s%.4f", i ? ", " : "", tot > 0 ? (double)(b.busy[i] - a.busy[i]) / (double)tot : 0.0);
    }
    printf("]");
}

/* ------------------------------------------------------------------- sink */

enum { S_HELLO = 0, S_HEAD, S_UPLOAD, S_DOWNLOAD, S_ECHO, S_WAIT_EOF };

typedef struct {
    unsigned char state;
    unsigned char hlen;
    unsigned char head[RR_SIZE];
    uint64_t remaining;
    uint64_t received;
    off_t off;
} sink_conn;

static sink_conn *g_sconns;
static int g_sconns_n;

static void sink_close(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
}

static void sink_set_events(int ep, int fd, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e);
}

/* Reads what it can; returns 0 to keep the connection, -1 to close it. */
static int sink_on_event(int ep, int fd, uint32_t events) {
    sink_conn *c = &g_sconns[fd];
    if (events & EPOLLERR) return -1;
    for (;;) {
        switch (c->state) {
        case S_HELLO: {
            /* RFC 8446 §5.1: type(1) version(2) length(2), then the fragment. */
            if (c->hlen < 5) {
                ssize_t r = recv(fd, c->head + c->hlen, 5u - c->hlen, MSG_DONTWAIT);
                if (r == 0) return -1;
                if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
                c->hlen = (unsigned char)(c->hlen + r);
                if (c->hlen == 5) {
                    if (c->head[0] != 0x16) return -1;
                    c->remaining = ((uint64_t)c->head[3] << 8) | c->head[4];
                }
                continue;
            }
            if (c->remaining == 0) {
                c->hlen = 0;
                c->state = S_HEAD;
                continue;
            }
            ssize_t r = discard(fd, c->remaining);
            if (r == 0) return -1;
            if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            c->remaining -= (uint64_t)r;
            continue;
        }
        case S_HEAD: {
            size_t need;
            if (c->hlen == 0) {
                need = 1;
            } else if (c->head[0] == 'U' || c->head[0] == 'D') {
                need = 9;
            } else if (c->head[0] == 'R') {
                need = RR_SIZE;
            } else if (c->head[0] == 'E') {
                c->state = S_ECHO;
                continue;
            } else {
                return -1;
            }
            if (c->hlen < need) {
                ssize_t r = recv(fd, c->head + c->hlen, need - c->hlen, MSG_DONTWAIT);
                if (r == 0) return -1;
                if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
                c->hlen = (unsigned char)(c->hlen + r);
                continue;
            }
            if (c->head[0] == 'U') {
                c->remaining = get_u64be(c->head + 1);
                c->received = 0;
                c->state = S_UPLOAD;
            } else if (c->head[0] == 'D') {
                c->remaining = get_u64be(c->head + 1);
                c->off = 0;
                c->state = S_DOWNLOAD;
                sink_set_events(ep, fd, EPOLLOUT);
                return 0;
            } else { /* 'R' */
                unsigned char reply[RR_SIZE];
                memset(reply, 'r', sizeof reply);
                /* The sink closes first: TIME_WAIT then lands on the listening
                 * sides, and the 28k ephemeral ports of the client and of the
                 * proxy's upstream leg never run out at >10k tunnels/s. */
                send(fd, reply, sizeof reply, MSG_NOSIGNAL);
                return -1;
            }
            continue;
        }
        case S_UPLOAD: {
            if (c->remaining == 0) {
                unsigned char ack[8];
                put_u64be(ack, c->received);
                if (send(fd, ack, 8, MSG_NOSIGNAL) != 8) return -1;
                c->state = S_WAIT_EOF;
                continue;
            }
            ssize_t r = discard(fd, c->remaining);
            if (r == 0) return -1;
            if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            c->remaining -= (uint64_t)r;
            c->received += (uint64_t)r;
            continue;
        }
        case S_DOWNLOAD: {
            if (!(events & EPOLLOUT) && c->remaining) return 0;
            while (c->remaining) {
                ssize_t r = send_from_memfd(fd, &c->off, c->remaining);
                if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
                if (r == 0) return -1;
                c->remaining -= (uint64_t)r;
            }
            c->state = S_WAIT_EOF;
            sink_set_events(ep, fd, EPOLLIN);
            return 0;
        }
        case S_ECHO: {
            char buf[4096];
            ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r == 0) return -1;
            if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            /* Echo traffic is a byte per tunnel: a short write means a broken peer. */
            if (send(fd, buf, (size_t)r, MSG_NOSIGNAL | MSG_DONTWAIT) != r) return -1;
            continue;
        }
        case S_WAIT_EOF: {
            ssize_t r = discard(fd, 1u << 20);
            if (r == 0) return -1;
            if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            continue;
        }
        }
    }
}

static int run_sink(int port, double lifetime) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    g_sconns_n = (int)(rl.rlim_cur > 1048576 ? 1048576 : rl.rlim_cur);
    g_sconns = calloc((size_t)g_sconns_n, sizeof *g_sconns);
    if (!g_sconns) die("calloc");
    make_memfd();

    int bound;
    int ls = listen_loopback(port, SOCK_NONBLOCK, &bound);

    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    e.data.fd = 0;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e); /* stdin closing ends the sink */

    printf("{\"port\": %d, \"pid\": %d}\n", bound, (int)getpid());
    fflush(stdout);

    double deadline = now_s() + lifetime;
    struct epoll_event evs[MAX_EVENTS];
    while (!g_stop && now_s() < deadline) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 1000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == 0) {
                char b[256];
                ssize_t r = read(0, b, sizeof b);
                if (r <= 0) g_stop = 1;
            } else if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= g_sconns_n) {
                        close(c);
                        continue;
                    }
                    memset(&g_sconns[c], 0, sizeof g_sconns[c]);
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
            } else if (sink_on_event(ep, fd, evs[i].events) < 0) {
                sink_close(ep, fd);
            }
        }
    }
    return 0;
}

/* ----------------------------------------------------------------- client */

typedef struct {
    struct sockaddr_in to;
    const char *connect_name; /* NULL: direct path */
    char req[512];
    size_t req_len;
    double timeout;
} client_cfg;

static client_cfg g_cfg;

/* A TLS 1.3 ClientHello record as a Kong data plane would send it: SNI,
 * supported_versions, groups, key_share, signature_algorithms, ALPN. Only
 * its shape matters (nothing answers it with TLS). */
static unsigned char g_hello[512];
static size_t g_hello_len;

static void put16(unsigned char *p, size_t v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void build_client_hello(const char *sni) {
    unsigned char *b = g_hello;
    size_t n = 0, sni_len = strlen(sni);
    if (sni_len > 200) die("--sni too long");
    b[n++] = 0x16; /* handshake record, legacy version TLS 1.0 */
    b[n++] = 0x03;
    b[n++] = 0x01;
    size_t rec_len_at = n;
    n += 2;
    b[n++] = 0x01; /* ClientHello */
    size_t hs_len_at = n;
    n += 3;
    b[n++] = 0x03; /* legacy_version TLS 1.2 */
    b[n++] = 0x03;
    for (int i = 0; i < 32; i++) b[n++] = (unsigned char)(i * 7 + 1); /* random */
    b[n++] = 32;                                                       /* session id */
    for (int i = 0; i < 32; i++) b[n++] = (unsigned char)(i * 5 + 3);
    static const unsigned char suites[] = {0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2f, 0xc0, 0x2b};
    put16(b + n, sizeof suites);
    n += 2;
    memcpy(b + n, suites, sizeof suites);
    n += sizeof suites;
    b[n++] = 1; /* compression methods: null */
    b[n++] = 0;
    size_t ext_len_at = n;
    n += 2;
    /* server_name (RFC 6066 §3) */
    put16(b + n, 0x0000);
    put16(b + n + 2, sni_len + 5);
    put16(b + n + 4, sni_len + 3);
    b[n + 6] = 0; /* host_name */
    put16(b + n + 7, sni_len);
    memcpy(b + n + 9, sni, sni_len);
    n += 9 + sni_len;
    static const unsigned char fixed[] = {
        0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04,             /* supported_versions: 1.3 */
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, /* groups */
        0x00, 0x0d, 0x00, 0x0a, 0x00, 0x08, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x08, 0x07,
        0x00, 0x10, 0x00, 0x0b, 0x00, 0x09, 0x08, 'h', 't', 't', 'p', '/', '1', '.', '1',
        0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20, /* key_share x25519 */
    };
    memcpy(b + n, fixed, sizeof fixed);
    n += sizeof fixed;
    for (int i = 0; i < 32; i++) b[n++] = (unsigned char)(i * 11 + 9);
    put16(b + ext_len_at, n - ext_len_at - 2);
    size_t hs_len = n - hs_len_at - 3;
    b[hs_len_at] = 0;
    put16(b + hs_len_at + 1, hs_len);
    put16(b + rec_len_at, n - rec_len_at - 2);
    g_hello_len = n;
}

/* Status line "HTTP/1.x 200 ..." and the head ends exactly at the buffer end. */
static int response_ok(const char *buf, size_t len) {
    if (len < 16 || memcmp(buf, "HTTP/1.", 7) != 0) return 0;
    if (memcmp(buf + 8, " 200", 4) != 0) return 0;
    return memcmp(buf + len - 4, "\r\n\r\n", 4) == 0;
}

static int head_complete(const char *buf, size_t len) {
    return len >= 4 && memmem(buf, len, "\r\n\r\n", 4) != NULL;
}

/* Blocking tunnel setup (bulk mode, N <= a few): returns a connected socket. */
static int open_tunnel_blocking(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {.tv_sec = (time_t)TUNNEL_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&g_cfg.to, sizeof g_cfg.to) < 0)
        die("connect: %s", strerror(errno));
    if (g_cfg.connect_name) {
        if (send(fd, g_cfg.req, g_cfg.req_len, MSG_NOSIGNAL) != (ssize_t)g_cfg.req_len)
            die("send CONNECT: %s", strerror(errno));
        char buf[MAX_RESPONSE_HEAD];
        size_t len = 0;
        while (!head_complete(buf, len)) {
            if (len == sizeof buf) die("CONNECT response head too long");
            ssize_t r = recv(fd, buf + len, sizeof buf - len, 0);
            if (r <= 0) die("CONNECT response: %s", r == 0 ? "closed" : strerror(errno));
            len += (size_t)r;
        }
        if (!response_ok(buf, len)) {
            buf[len < 60 ? len : 60] = 0;
            die("CONNECT refused: %s", buf);
        }
    }
    set_nonblock(fd);
    return fd;
}

typedef struct {
    int fd;
    int done;
    uint64_t remaining;
    off_t off;
    unsigned char ack[8];
    int acklen;
} bulk_conn;

static int run_bulk(int up, int ntun, uint64_t bytes) {
    make_memfd();
    bulk_conn *bc = calloc((size_t)ntun, sizeof *bc);
    if (!bc) die("calloc");
    for (int i = 0; i < ntun; i++) bc[i].fd = open_tunnel_blocking();

    int ep = epoll_create1(0);
    cpu_mark m0 = cpu_now();
    for (int i = 0; i < ntun; i++) {
        unsigned char hdr[sizeof g_hello + 9];
        memcpy(hdr, g_hello, g_hello_len);
        hdr[g_hello_len] = up ? 'U' : 'D';
        put_u64be(hdr + g_hello_len + 1, bytes);
        ssize_t hn = (ssize_t)g_hello_len + 9;
        if (send(bc[i].fd, hdr, (size_t)hn, MSG_NOSIGNAL) != hn)
            die("send header: %s", strerror(errno));
        bc[i].remaining = bytes;
        struct epoll_event e = {.events = up ? EPOLLOUT : EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, bc[i].fd, &e);
    }
    int left = ntun;
    double deadline = m0.t + g_cfg.timeout;
    struct epoll_event evs[MAX_EVENTS];
    while (left > 0) {
        if (now_s() > deadline) die("bulk timed out with %d tunnels unfinished", left);
        int n = epoll_wait(ep, evs, MAX_EVENTS, 1000);
        for (int k = 0; k < n; k++) {
            bulk_conn *c = &bc[evs[k].data.u32];
            if (c->done) continue;
            if (up && c->remaining) {
                while (c->remaining) {
                    ssize_t r = send_from_memfd(c->fd, &c->off, c->remaining);
                    if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                    if (r <= 0) die("upload: %s", r == 0 ? "closed" : strerror(errno));
                    c->remaining -= (uint64_t)r;
                }
                if (c->remaining == 0) {
                    struct epoll_event e = {.events = EPOLLIN, .data.u32 = evs[k].data.u32};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                }
            } else if (up) {
                ssize_t r = recv(c->fd, c->ack + c->acklen, (size_t)(8 - c->acklen), MSG_DONTWAIT);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (r <= 0) die("upload ack: %s", r == 0 ? "closed" : strerror(errno));
                c->acklen += (int)r;
                if (c->acklen == 8) {
                    if (get_u64be(c->ack) != bytes) die("sink received a different byte count");
                    c->done = 1;
                    left--;
                }
            } else {
                for (;;) {
                    ssize_t r = discard(c->fd, c->remaining);
                    if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                    if (r <= 0) die("download: %s", r == 0 ? "closed early" : strerror(errno));
                    c->remaining -= (uint64_t)r;
                    if (c->remaining == 0) {
                        c->done = 1;
                        left--;
                        break;
                    }
                }
            }
        }
    }
    cpu_mark m1 = cpu_now();
    double secs = m1.t - m0.t;
    uint64_t total = bytes * (uint64_t)ntun;
    printf("{\"mode\": \"bulk\", \"dir\": \"%s\", \"tunnels\": %d, \"bytes\": %llu, "
           "\"seconds\": %.6f, \"bytes_per_s\": %.1f",
           up ? "up" : "down", ntun, (unsigned long long)total, secs, (double)total / secs);
    print_cpu(m0, m1);
    printf("}\n");
    for (int i = 0; i < ntun; i++) close(bc[i].fd);
    return 0;
}

/* Non-blocking tunnel state machine shared by the setup and idle modes. */
enum { T_FREE, T_CONNECTING, T_READ_RESPONSE, T_READ_REPLY, T_READ_EOF, T_OPEN };

typedef struct {
    int fd;
    unsigned char state;
    unsigned short got;
    double start;
    double latency;
    char buf[MAX_RESPONSE_HEAD];
} tunnel;

static int g_ep;
static int g_idle; /* idle mode: echo "x" instead of request/reply, keep open */
static unsigned char g_request[RR_SIZE];

static void t_fail(tunnel *t) {
    close(t->fd);
    t->fd = -1;
    t->state = T_FREE;
}

static int t_start(tunnel *t, uint32_t idx) {
    t->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (t->fd < 0) return -1;
    int one = 1;
    setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    t->start = now_s();
    t->got = 0;
    t->state = T_CONNECTING;
    struct epoll_event e = {.events = EPOLLOUT, .data.u32 = idx};
    int r = connect(t->fd, (struct sockaddr *)&g_cfg.to, sizeof g_cfg.to);
    if (r < 0 && errno != EINPROGRESS) {
        t_fail(t);
        return -1;
    }
    epoll_ctl(g_ep, EPOLL_CTL_ADD, t->fd, &e);
    return 0;
}

/* The hello record, then the 64-byte request (setup) or "Ex" (idle), in one write. */
static unsigned char g_payload[sizeof g_hello + RR_SIZE];
static size_t g_payload_len;

static void build_payload(void) {
    memcpy(g_payload, g_hello, g_hello_len);
    if (g_idle) {
        memcpy(g_payload + g_hello_len, "Ex", 2);
        g_payload_len = g_hello_len + 2;
    } else {
        memcpy(g_payload + g_hello_len, g_request, RR_SIZE);
        g_payload_len = g_hello_len + RR_SIZE;
    }
}

static int t_send_payload(tunnel *t, uint32_t idx) {
    if (send(t->fd, g_payload, g_payload_len, MSG_NOSIGNAL) != (ssize_t)g_payload_len) return -1;
    t->got = 0;
    t->state = T_READ_REPLY;
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = idx};
    epoll_ctl(g_ep, EPOLL_CTL_MOD, t->fd, &e);
    return 0;
}

/* Advances one tunnel; returns 1 when it completed, 0 to wait, -1 on failure. */
static int t_event(tunnel *t, uint32_t idx, uint32_t events) {
    if (t->state == T_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (events & EPOLLERR)) return -1;
        if (!g_cfg.connect_name) return t_send_payload(t, idx);
        if (send(t->fd, g_cfg.req, g_cfg.req_len, MSG_NOSIGNAL) != (ssize_t)g_cfg.req_len) return -1;
        t->state = T_READ_RESPONSE;
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = idx};
        epoll_ctl(g_ep, EPOLL_CTL_MOD, t->fd, &e);
        return 0;
    }
    if (t->state == T_READ_RESPONSE) {
        ssize_t r = recv(t->fd, t->buf + t->got, sizeof t->buf - t->got, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (r <= 0) return -1;
        t->got = (unsigned short)(t->got + r);
        if (!head_complete(t->buf, t->got)) return t->got == sizeof t->buf ? -1 : 0;
        if (!response_ok(t->buf, t->got)) return -1;
        return t_send_payload(t, idx);
    }
    if (t->state == T_READ_REPLY) {
        size_t want = g_idle ? 1 : RR_SIZE;
        ssize_t r = recv(t->fd, t->buf + t->got, want - t->got, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (r <= 0) return -1;
        t->got = (unsigned short)(t->got + r);
        if (t->got < want) return 0;
        if (g_idle ? t->buf[0] != 'x' : t->buf[0] != 'r') return -1;
        if (g_idle) return 1;
        t->latency = now_s() - t->start;
        t->state = T_READ_EOF;
        return 0;
    }
    if (t->state == T_READ_EOF) {
        ssize_t r = recv(t->fd, t->buf, 1, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        return r == 0 ? 1 : -1;
    }
    /* T_OPEN: an idle tunnel must stay silent; any event means it broke. */
    return -1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double *v, size_t n, double p) {
    if (n == 0) return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i];
}

static int run_setup(int conc, double duration, long max) {
    g_ep = epoll_create1(0);
    memset(g_request, 'q', sizeof g_request);
    g_request[0] = 'R';
    build_payload();
    if (max <= 0 || max > (long)MAX_SAMPLES) max = MAX_SAMPLES;
    double *lat = malloc(sizeof(double) * (size_t)max);
    tunnel *ts = calloc((size_t)conc, sizeof *ts);
    if (!lat || !ts) die("malloc");
    size_t done = 0;
    long started = 0, errors = 0;
    cpu_mark m0 = cpu_now();
    double end = m0.t + duration;
    double hard_end = end + TUNNEL_TIMEOUT_S;
    int active = 0;
    for (int i = 0; i < conc && started < max; i++) {
        started++;
        if (t_start(&ts[i], (uint32_t)i) == 0) active++;
        else errors++;
    }
    struct epoll_event evs[MAX_EVENTS];
    double t_last = m0.t;
    while (active > 0) {
        double now = now_s();
        if (now > hard_end) die("setup: %d tunnels stuck after the run", active);
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, 100);
        for (int k = 0; k < n; k++) {
            uint32_t idx = evs[k].data.u32;
            tunnel *t = &ts[idx];
            if (t->state == T_FREE) continue;
            int r = t_event(t, idx, evs[k].events);
            if (r == 0) continue;
            now = now_s();
            if (r > 0) {
                lat[done++] = t->latency;
                t_last = now;
                close(t->fd);
                t->state = T_FREE;
            } else {
                errors++;
                t_fail(t);
            }
            active--;
            if (errors > 100) die("setup: too many failed tunnels (%ld)", errors);
            if (now < end && started < max) {
                started++;
                if (t_start(t, idx) == 0) active++;
                else errors++;
            }
        }
        /* A tunnel stuck past its own timeout counts as failed. */
        now = now_s();
        for (int i = 0; i < conc; i++) {
            if (ts[i].state != T_FREE && now - ts[i].start > TUNNEL_TIMEOUT_S) {
                errors++;
                t_fail(&ts[i]);
                active--;
                if (now < end && started < max) {
                    started++;
                    if (t_start(&ts[i], (uint32_t)i) == 0) active++;
                    else errors++;
                }
            }
        }
    }
    cpu_mark m1 = cpu_now();
    m1.t = t_last > m0.t ? t_last : m1.t;
    double secs = m1.t - m0.t;
    qsort(lat, done, sizeof *lat, cmp_double);
    printf("{\"mode\": \"setup\", \"concurrency\": %d, \"tunnels\": %zu, \"errors\": %ld, "
           "\"seconds\": %.6f, \"tunnels_per_s\": %.1f, \"p50_ms\": %.4f, \"p99_ms\": %.4f, "
           "\"max_ms\": %.4f",
           conc, done, errors, secs, secs > 0 ? (double)done / secs : 0.0,
           percentile(lat, done, 0.50) * 1e3, percentile(lat, done, 0.99) * 1e3,
           done ? lat[done - 1] * 1e3 : 0.0);
    print_cpu(m0, m1);
    printf("}\n");
    return 0;
}

/* Waits for a line on stdin (or EOF, or the hold time) while watching the tunnels. */
static long idle_hold(tunnel *ts, double hold) {
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(g_ep, EPOLL_CTL_ADD, 0, &e);
    long broken = 0;
    double end = now_s() + hold;
    struct epoll_event evs[MAX_EVENTS];
    int waiting = 1;
    while (waiting && now_s() < end && !g_stop) {
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, 200);
        for (int k = 0; k < n; k++) {
            uint32_t idx = evs[k].data.u32;
            if (idx == UINT32_MAX) {
                char b[256];
                ssize_t r = read(0, b, sizeof b);
                (void)r;
                waiting = 0;
            } else if (ts[idx].state == T_OPEN) {
                broken++;
                t_fail(&ts[idx]);
            }
        }
    }
    epoll_ctl(g_ep, EPOLL_CTL_DEL, 0, NULL);
    return broken;
}

static int run_idle(long *steps, int nsteps, double hold) {
    g_ep = epoll_create1(0);
    g_idle = 1;
    build_payload();
    long max = steps[nsteps - 1];
    if (max > MAX_IDLE) die("at most %d idle tunnels", MAX_IDLE);
    tunnel *ts = calloc((size_t)max, sizeof *ts);
    if (!ts) die("calloc");
    long opened = 0, started = 0, errors = 0, broken = 0;
    int active = 0;
    cpu_mark m0 = cpu_now();
    struct epoll_event evs[MAX_EVENTS];
    for (int s = 0; s < nsteps; s++) {
        long target = steps[s];
        double deadline = now_s() + g_cfg.timeout;
        while (opened < target) {
            while (active < IDLE_CONCURRENCY && started < target) {
                if (t_start(&ts[started], (uint32_t)started) < 0) die("idle: socket: %s", strerror(errno));
                started++;
                active++;
            }
            if (now_s() > deadline) die("idle: timed out with %ld of %ld tunnels open", opened, target);
            int n = epoll_wait(g_ep, evs, MAX_EVENTS, 100);
            for (int k = 0; k < n; k++) {
                uint32_t idx = evs[k].data.u32;
                tunnel *t = &ts[idx];
                if (t->state == T_FREE) continue;
                int was_open = t->state == T_OPEN;
                int r = t_event(t, idx, evs[k].events);
                if (r == 0) continue;
                if (r > 0) {
                    t->state = T_OPEN;
                    opened++;
                    active--;
                } else {
                    if (was_open) {
                        broken++;
                        opened--;
                    } else {
                        errors++;
                        active--;
                    }
                    t_fail(t);
                }
            }
            if (errors || broken) die("idle: %ld tunnels failed to open, %ld broke", errors, broken);
        }
        cpu_mark m1 = cpu_now();
        printf("{\"mode\": \"idle\", \"open\": %ld, \"seconds\": %.6f", opened, m1.t - m0.t);
        print_cpu(m0, m1);
        printf("}\n");
        fflush(stdout);
        broken += idle_hold(ts, hold);
        if (broken) die("idle: %ld open tunnels broke while held", broken);
    }
    for (long i = 0; i < max; i++)
        if (ts[i].state != T_FREE) close(ts[i].fd);
    printf("{\"mode\": \"idle\", \"closed\": %ld}\n", opened);
    return 0;
}

/* --------------------------------------------------------------- refrelay */

/*
 * The reference relay: the least a CONNECT relay must do on this machine, as
 * a ceiling to read the real relays against. It is not a proxy: no policy,
 * no log, no name lookup; it ignores the CONNECT target and dials the one
 * upstream given on the command line. Per tunnel: read the request head,
 * connect, answer 200, then move bytes each way with splice(2) through one
 * pipe per direction (socket -> pipe -> socket, no copy through user space),
 * with the pipe size and TCP_NOTSENT_LOWAT that relay/splice.py uses.
 */

/* Largest request head: a Kong CONNECT head is < 200 bytes; anything longer
 * without its blank line is not a CONNECT request worth reading. */
#define REF_MAX_HEAD 8192
/* Capacity asked for each pipe, the most one splice moves (as relay/splice.py);
 * if the kernel refuses (pipe-user-pages-soft), the pipe keeps its default. */
#define REF_PIPE_SIZE (1 << 20)
/* Unsent bytes the kernel queues per socket once connected (as relay/splice.py):
 * bounds what a stalled peer pins and was faster on loopback than no limit. */
#define REF_NOTSENT_LOWAT (128 * 1024)
/* splice calls per direction per event, so one bulk tunnel cannot hold up the
 * others; level-triggered epoll reports what is left on the next round. */
#define REF_ROUNDS 16

static const char REF_OK[] = "HTTP/1.1 200 Connection Established\r\n\r\n";

enum { R_HEAD, R_CONNECTING, R_OPEN, R_CLOSED };

typedef struct ref_tunnel ref_tunnel;

/* One socket of a tunnel as epoll sees it (data.ptr points here). */
typedef struct {
    ref_tunnel *t;
    int fd;
    uint32_t events; /* interest registered with epoll; 0 = not registered */
} ref_end;

/* One direction: end[d] -> pipe -> end[1 - d]. */
typedef struct {
    int pr, pw;     /* the pipe's read and write ends */
    size_t pending; /* bytes in the pipe */
    unsigned char eof, full, done;
} ref_dir;

struct ref_tunnel {
    unsigned char state;
    ref_end end[2]; /* 0: client, 1: upstream */
    ref_dir dir[2]; /* 0: client -> upstream, 1: upstream -> client */
    char *head;     /* the request head and any bytes behind it, until open */
    size_t got, head_len;
    ref_tunnel *next_dead;
};

static int g_ref_ep = -1;
static struct sockaddr_in g_ref_upstream;
/* Tunnels closed during one batch of events, freed after it: a later event of
 * the same batch may still point at them. */
static ref_tunnel *g_ref_dead;
/* Sentinels for the listener and stdin in epoll's data.ptr. */
static ref_end g_ref_listener = {.fd = -1}, g_ref_stdin = {.fd = 0};
static int g_ref_paused; /* listener out of the epoll set after EMFILE */

static void ref_watch(ref_end *e, uint32_t events) {
    if (events == e->events) return;
    struct epoll_event ev = {.events = events, .data.ptr = e};
    /* An fd left in the set with no interest would still report EPOLLHUP and
     * EPOLLERR (level-triggered, unmaskable): out of the set it stays quiet. */
    int op = events == 0 ? EPOLL_CTL_DEL : e->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    epoll_ctl(g_ref_ep, op, e->fd, &ev);
    e->events = events;
}

static void ref_close(ref_tunnel *t) {
    for (int i = 0; i < 2; i++) {
        if (t->end[i].fd >= 0) close(t->end[i].fd); /* also leaves the epoll set */
        if (t->dir[i].pr >= 0) close(t->dir[i].pr);
        if (t->dir[i].pw >= 0) close(t->dir[i].pw);
    }
    free(t->head);
    t->head = NULL;
    t->state = R_CLOSED;
    t->next_dead = g_ref_dead;
    g_ref_dead = t;
    if (g_ref_paused) { /* a descriptor came free: accept again */
        g_ref_paused = 0;
        ref_watch(&g_ref_listener, EPOLLIN);
    }
}

/* Interest of each socket: readable while its outgoing direction's pipe has
 * room, writable while the incoming direction's pipe holds bytes. */
static void ref_rearm(ref_tunnel *t) {
    for (int e = 0; e < 2; e++) {
        ref_dir *out = &t->dir[e], *in = &t->dir[1 - e];
        uint32_t ev = 0;
        if (!out->done && !out->eof && !out->full) ev |= EPOLLIN;
        if (!in->done && in->pending) ev |= EPOLLOUT;
        ref_watch(&t->end[e], ev);
    }
}

/* Moves what it can through direction d; returns -1 when the tunnel must close. */
static int ref_pump(ref_tunnel *t, int d) {
    ref_dir *p = &t->dir[d];
    int src = t->end[d].fd, dst = t->end[1 - d].fd;
    int out_blocked = 0;
    for (int round = 0; round < REF_ROUNDS && !p->done; round++) {
        if (p->pending && !out_blocked) {
            ssize_t n = splice(p->pr, NULL, dst, NULL, p->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                p->pending -= (size_t)n;
                p->full = 0;
            } else if (n < 0 && errno == EAGAIN) {
                out_blocked = 1;
            } else if (n < 0 && errno != EINTR) {
                return -1;
            }
        }
        if (p->eof || p->full) break;
        ssize_t n = splice(src, NULL, p->pw, NULL, REF_PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            p->pending += (size_t)n;
        } else if (n == 0) {
            p->eof = 1;
        } else if (errno == EAGAIN) {
            /* The socket is empty or the pipe is full; with bytes in the pipe
             * take it as full and read again once some went out. */
            if (p->pending) p->full = 1;
            return 0;
        } else if (errno != EINTR) {
            return -1;
        }
    }
    if (p->eof && !p->pending && !p->done) { /* EOF goes out after the last byte */
        shutdown(dst, SHUT_WR);
        p->done = 1;
    }
    return 0;
}

/* The upstream answered: 200 to the client, bytes behind the head upstream. */
static void ref_open(ref_tunnel *t) {
    int lowat = REF_NOTSENT_LOWAT;
    for (int i = 0; i < 2; i++) {
        setsockopt(t->end[i].fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
            ref_close(t);
            return;
        }
        t->dir[i].pr = p[0];
        t->dir[i].pw = p[1];
        fcntl(p[1], F_SETPIPE_SZ, REF_PIPE_SIZE);
    }
    ssize_t ok_len = (ssize_t)sizeof REF_OK - 1;
    if (send(t->end[0].fd, REF_OK, (size_t)ok_len, MSG_NOSIGNAL) != ok_len) {
        ref_close(t);
        return;
    }
    /* Bytes the client sent behind its head start the upstream pipe (at most
     * REF_MAX_HEAD bytes: an empty pipe holds them even at two pages). */
    size_t extra = t->got - t->head_len;
    if (extra) {
        if (write(t->dir[0].pw, t->head + t->head_len, extra) != (ssize_t)extra) {
            ref_close(t);
            return;
        }
        t->dir[0].pending = extra;
    }
    free(t->head);
    t->head = NULL;
    t->state = R_OPEN;
    if (extra && ref_pump(t, 0) < 0) {
        ref_close(t);
        return;
    }
    ref_rearm(t);
}

static void ref_connect(ref_tunnel *t) {
    int u = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (u < 0) {
        ref_close(t);
        return;
    }
    int one = 1;
    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    t->end[1].fd = u;
    ref_watch(&t->end[0], 0); /* nothing more is read from the client until open */
    if (connect(u, (struct sockaddr *)&g_ref_upstream, sizeof g_ref_upstream) == 0) {
        ref_open(t);
    } else if (errno == EINPROGRESS) {
        t->state = R_CONNECTING;
        ref_watch(&t->end[1], EPOLLOUT);
    } else {
        ref_close(t);
    }
}

/* Reads the head: "CONNECT ..." up to the blank line, within REF_MAX_HEAD. */
static void ref_read_head(ref_tunnel *t) {
    for (;;) {
        ssize_t r = recv(t->end[0].fd, t->head + t->got, REF_MAX_HEAD - t->got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return;
        if (r <= 0) {
            ref_close(t);
            return;
        }
        size_t from = t->got > 3 ? t->got - 3 : 0;
        t->got += (size_t)r;
        char *end = memmem(t->head + from, t->got - from, "\r\n\r\n", 4);
        if (end) {
            t->head_len = (size_t)(end + 4 - t->head);
            if (t->head_len < 8 || memcmp(t->head, "CONNECT ", 8) != 0) ref_close(t);
            else ref_connect(t);
            return;
        }
        if (t->got == REF_MAX_HEAD) {
            ref_close(t);
            return;
        }
    }
}

static void ref_event(ref_end *e, uint32_t events) {
    ref_tunnel *t = e->t;
    int side = (int)(e - t->end);
    if (t->state == R_HEAD) {
        ref_read_head(t);
        return;
    }
    if (t->state == R_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(t->end[1].fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & EPOLLERR)) ref_close(t);
        else ref_open(t);
        return;
    }
    /* Readable: the direction this socket feeds; writable: the one it drains.
     * An error or hang-up goes to both, where the next splice reports it. */
    uint32_t broken = events & (EPOLLERR | EPOLLHUP);
    if (((events & EPOLLIN) || broken) && ref_pump(t, side) < 0) {
        ref_close(t);
        return;
    }
    if (((events & EPOLLOUT) || broken) && ref_pump(t, 1 - side) < 0) {
        ref_close(t);
        return;
    }
    if (t->dir[0].done && t->dir[1].done) ref_close(t);
    else ref_rearm(t);
}

static void ref_accept(int ls) {
    for (;;) {
        int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE) { /* wait for a close, don't spin */
                g_ref_paused = 1;
                ref_watch(&g_ref_listener, 0);
            }
            return;
        }
        ref_tunnel *t = calloc(1, sizeof *t);
        char *head = malloc(REF_MAX_HEAD);
        if (!t || !head) {
            free(t);
            free(head);
            close(c);
            continue;
        }
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        t->head = head;
        t->state = R_HEAD;
        for (int i = 0; i < 2; i++) {
            t->end[i].t = t;
            t->end[i].fd = -1;
            t->dir[i].pr = t->dir[i].pw = -1;
        }
        t->end[0].fd = c;
        ref_watch(&t->end[0], EPOLLIN);
    }
}

static int run_refrelay(int port, const char *upstream, double lifetime) {
    parse_hostport(upstream, &g_ref_upstream);
    int bound;
    int ls = listen_loopback(port, SOCK_NONBLOCK | SOCK_CLOEXEC, &bound);

    g_ref_ep = epoll_create1(EPOLL_CLOEXEC);
    g_ref_listener.fd = ls;
    ref_watch(&g_ref_listener, EPOLLIN);
    ref_watch(&g_ref_stdin, EPOLLIN); /* stdin closing ends the relay */

    printf("{\"port\": %d, \"pid\": %d}\n", bound, (int)getpid());
    fflush(stdout);

    double deadline = now_s() + lifetime;
    struct epoll_event evs[MAX_EVENTS];
    while (!g_stop && now_s() < deadline) {
        int n = epoll_wait(g_ref_ep, evs, MAX_EVENTS, 1000);
        for (int i = 0; i < n; i++) {
            ref_end *e = evs[i].data.ptr;
            if (e == &g_ref_stdin) {
                char b[256];
                if (read(0, b, sizeof b) <= 0) g_stop = 1;
            } else if (e == &g_ref_listener) {
                ref_accept(ls);
            } else if (e->t->state != R_CLOSED) {
                ref_event(e, evs[i].events);
            }
        }
        while (g_ref_dead) {
            ref_tunnel *t = g_ref_dead;
            g_ref_dead = t->next_dead;
            free(t);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen sink [--port P] [--lifetime S]\n"
            "       loadgen bulk  --to H:P [--connect NAME:PORT] --dir up|down --tunnels N --bytes B\n"
            "       loadgen setup --to H:P [--connect NAME:PORT] --concurrency C --duration S [--max N]\n"
            "       loadgen idle  --to H:P [--connect NAME:PORT] --steps N1,N2,... [--hold S]\n"
            "       loadgen refrelay --upstream H:P [--port P] [--lifetime S]\n"
            "common: [--timeout S] [--watch PID,...] [--load-pid PID] [--sni NAME]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1];
    const char *to = NULL, *upstream = NULL, *dir = "up", *steps_s = "1000", *sni = "bench.eu.cp0.konghq.com";
    int port = 0, tunnels = 1, conc = 1;
    double lifetime = 3600, duration = 1, hold = 120;
    long max = 0;
    unsigned long long bytes = 1u << 20;
    g_cfg.timeout = 120;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        i++;
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--lifetime")) lifetime = atof(v);
        else if (!strcmp(a, "--to")) to = v;
        else if (!strcmp(a, "--upstream")) upstream = v;
        else if (!strcmp(a, "--connect")) g_cfg.connect_name = v;
        else if (!strcmp(a, "--sni")) sni = v;
        else if (!strcmp(a, "--dir")) dir = v;
        else if (!strcmp(a, "--tunnels")) tunnels = atoi(v);
        else if (!strcmp(a, "--bytes")) bytes = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--concurrency")) conc = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--max")) max = atol(v);
        else if (!strcmp(a, "--steps")) steps_s = v;
        else if (!strcmp(a, "--hold")) hold = atof(v);
        else if (!strcmp(a, "--timeout")) g_cfg.timeout = atof(v);
        else if (!strcmp(a, "--load-pid")) g_load_pid = atoi(v);
        else if (!strcmp(a, "--watch")) {
            char *copy = strdup(v), *save = NULL;
            for (char *p = strtok_r(copy, ",", &save); p && g_nwatch < MAX_WATCH;
                 p = strtok_r(NULL, ",", &save))
                g_watch[g_nwatch++] = atoi(p);
            free(copy);
        } else usage();
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* Every client mode ends by itself: the watchdog stops a wedged run. */
    int server = !strcmp(mode, "sink") || !strcmp(mode, "refrelay");
    if (!server) alarm((unsigned)(g_cfg.timeout + hold * 8 + 30));

    if (!strcmp(mode, "sink")) return run_sink(port, lifetime);
    if (!strcmp(mode, "refrelay")) {
        if (!upstream) usage();
        return run_refrelay(port, upstream, lifetime);
    }
    if (!to) usage();
    parse_hostport(to, &g_cfg.to);
    build_client_hello(sni);
    if (g_cfg.connect_name) {
        int n = snprintf(g_cfg.req, sizeof g_cfg.req, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n",
                         g_cfg.connect_name, g_cfg.connect_name);
        if (n <= 0 || (size_t)n >= sizeof g_cfg.req) die("--connect name too long");
        g_cfg.req_len = (size_t)n;
    }
    if (!strcmp(mode, "bulk")) {
        if (tunnels < 1 || tunnels > 1024 || bytes == 0) usage();
        return run_bulk(!strcmp(dir, "up"), tunnels, bytes);
    }
    if (!strcmp(mode, "setup")) {
        if (conc < 1 || conc > 4096 || duration <= 0) usage();
        return run_setup(conc, duration, max);
    }
    if (!strcmp(mode, "idle")) {
        long steps[16];
        int ns = 0;
        char *copy = strdup(steps_s), *save = NULL;
        for (char *p = strtok_r(copy, ",", &save); p && ns < 16; p = strtok_r(NULL, ",", &save)) {
            steps[ns] = atol(p);
            if (steps[ns] <= 0 || (ns && steps[ns] < steps[ns - 1])) usage();
            ns++;
        }
        free(copy);
        if (!ns) usage();
        return run_idle(steps, ns, hold);
    }
    usage();
    return 2;
}
