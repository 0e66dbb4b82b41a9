/* The bench's TCP target (copied from shared/tools/wsbench): one thread per connection, 127.0.0.1 only.
 *
 *   target MODE PORT [BYTES]
 *
 * MODE:
 *   source  send BYTES (default 256 MiB) as fast as possible, then shut down and close
 *   sink    read and discard; when BYTES (if > 0) have arrived on a connection, send one
 *           byte 'K' back (the client's end-to-end completion signal); keep reading to EOF
 *   echo    write back everything read
 *   banner  send a 12-byte VNC-like banner "RFB 003.008\n", then read and discard to EOF
 *           (used for connection-setup and idle-connection scenarios)
 *   vncauth an RFB 3.8 server with VNC Authentication in front of `source` (the down-vnc
 *           scenario: twisted_novnc logs in with [vnc] password_file): send "RFB 003.008\n",
 *           read the client's 12-byte version, offer one security type (u8 1, u8 2), read the
 *           client's choice (must be 2), send a 16-byte challenge, read the 16-byte response
 *           and ACCEPT ANY RESPONSE (no DES here: the bench measures the relay after the
 *           login; the DES is tested against vncpasswd and a real Xvnc in tests/), send
 *           SecurityResult OK (u32 0), read ClientInit (1 byte, the browser's, passed on by
 *           the proxy), then act as `source` for BYTES (where a real server sends ServerInit)
 *   cut     echo the first BYTES read, then reset the connection (SO_LINGER 0): a VM
 *           cutting its relay (the soak)
 *
 * Prints "LISTENING <port>" on stdout once bound.  On SIGTERM/SIGINT prints a JSON line
 * with totals (connections, bytes_in, bytes_out) and exits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

enum { M_SOURCE, M_SINK, M_ECHO, M_BANNER, M_VNCAUTH, M_CUT };
static int mode;
static long long nbytes = 256LL << 20;
static atomic_llong conns, bytes_in, bytes_out;
#define BUFSZ (256 * 1024)

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w; atomic_fetch_add(&bytes_out, w);
    }
    return 0;
}

/* Read exactly n bytes; -1 on EOF or error. */
static int read_exact(int fd, char *p, size_t n) {
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        atomic_fetch_add(&bytes_in, r);
        p += r; n -= (size_t)r;
    }
    return 0;
}

/* The server's side of an RFB 3.8 opening with VNC Authentication, up to ClientInit; 0 when
 * the client went through it (any response to the challenge is accepted: see the top). */
static int vnc_login(int fd, char *buf) {
    static const char challenge[16] = "bench-challenge";
    if (write_all(fd, "RFB 003.008\n", 12) < 0 || read_exact(fd, buf, 12) < 0) return -1;
    if (memcmp(buf, "RFB 003.", 8) != 0) return -1;
    if (write_all(fd, "\x01\x02", 2) < 0 || read_exact(fd, buf, 1) < 0 || buf[0] != 2) return -1;
    if (write_all(fd, challenge, 16) < 0 || read_exact(fd, buf, 16) < 0) return -1;
    if (write_all(fd, "\0\0\0\0", 4) < 0 || read_exact(fd, buf, 1) < 0) return -1;
    return 0;
}

static void drain_to_eof(int fd, char *buf, int timeout_s) {
    if (timeout_s > 0) {
        struct timeval tv = {timeout_s, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
    for (;;) {
        ssize_t r = recv(fd, buf, BUFSZ, 0);
        if (r > 0) { atomic_fetch_add(&bytes_in, r); continue; }
        if (r < 0 && errno == EINTR) continue;
        break;
    }
}

static void *handle(void *arg) {
    int fd = (int)(long)arg;
    char *buf = malloc(BUFSZ);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    atomic_fetch_add(&conns, 1);
    if (mode == M_VNCAUTH && vnc_login(fd, buf) < 0) {
        close(fd);
        free(buf);
        return NULL;
    }
    if (mode == M_SOURCE || mode == M_VNCAUTH) {
        memset(buf, 'x', BUFSZ);
        long long left = nbytes;
        while (left > 0) {
            size_t n = left > BUFSZ ? BUFSZ : (size_t)left;
            if (write_all(fd, buf, n) < 0) break;
            left -= (long long)n;
        }
        shutdown(fd, SHUT_WR);
        drain_to_eof(fd, buf, 5); /* avoid RST losing in-flight data */
    } else if (mode == M_SINK) {
        long long got = 0; int acked = 0;
        for (;;) {
            ssize_t r = recv(fd, buf, BUFSZ, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += r; atomic_fetch_add(&bytes_in, r);
            if (!acked && nbytes > 0 && got >= nbytes) {
                acked = 1;
                if (write_all(fd, "K", 1) < 0) break;
            }
        }
    } else if (mode == M_CUT) { /* echo BYTES, then close: the VM side cutting a relay */
        long long got = 0;
        while (got < nbytes) {
            size_t want = nbytes - got > BUFSZ ? BUFSZ : (size_t)(nbytes - got);
            ssize_t r = recv(fd, buf, want, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += r; atomic_fetch_add(&bytes_in, r);
            if (write_all(fd, buf, (size_t)r) < 0) break;
        }
        /* A cut, not an end: reset (RST), whatever is still in flight. */
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    } else if (mode == M_ECHO) {
        for (;;) {
            ssize_t r = recv(fd, buf, BUFSZ, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            atomic_fetch_add(&bytes_in, r);
            if (write_all(fd, buf, (size_t)r) < 0) break;
        }
    } else { /* banner */
        if (write_all(fd, "RFB 003.008\n", 12) == 0) drain_to_eof(fd, buf, 0);
    }
    close(fd);
    free(buf);
    return NULL;
}

static volatile sig_atomic_t stop;
static void on_sig(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: target source|sink|echo|banner|vncauth|cut PORT [BYTES]\n"); return 2; }
    if (!strcmp(argv[1], "source")) mode = M_SOURCE;
    else if (!strcmp(argv[1], "sink")) { mode = M_SINK; nbytes = 0; }
    else if (!strcmp(argv[1], "echo")) mode = M_ECHO;
    else if (!strcmp(argv[1], "banner")) mode = M_BANNER;
    else if (!strcmp(argv[1], "vncauth")) mode = M_VNCAUTH;
    else if (!strcmp(argv[1], "cut")) mode = M_CUT;
    else { fprintf(stderr, "bad mode\n"); return 2; }
    int port = atoi(argv[2]);
    if (argc > 3) nbytes = atoll(argv[3]);

    struct sigaction sa = {0};
    sa.sa_handler = on_sig; /* no SA_RESTART: accept() returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET; a.sin_port = htons(port); a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    if (listen(ls, 4096) < 0) { perror("listen"); return 1; }
    printf("LISTENING %d\n", port); fflush(stdout);

    pthread_attr_t at; pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 128 * 1024);
    while (!stop) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) { if (errno == EINTR) continue; if (errno == EMFILE || errno == ENFILE) { usleep(10000); continue; } perror("accept"); continue; }
        pthread_t t;
        if (pthread_create(&t, &at, handle, (void *)(long)fd) != 0) close(fd);
    }
    printf("{\"target_mode\":\"%s\",\"connections\":%lld,\"bytes_in\":%lld,\"bytes_out\":%lld}\n",
           argv[1], (long long)conns, (long long)bytes_in, (long long)bytes_out);
    fflush(stdout);
    return 0;
}
