/* A minimal native storage SCP with the node's durability, to measure the floor of benchmarks/receive.py.
 *
 *     cc -O2 -o /tmp/durable_scp benchmarks/durable_scp.c -lsqlite3
 *     /tmp/durable_scp PORT DIR [--writeback]
 *
 * Not part of the node and not a DICOM implementation to use: it accepts every association and every
 * presentation context, answers C-ECHO and C-STORE only, and trusts its peer. What it does per instance
 * is what the node does before each acknowledgement, in native code and nothing else: each data set
 * fragment written to a temporary file as it arrives, then fsync of the file, rename into DIR, fsync of
 * DIR, and one row committed to a SQLite database in WAL mode with synchronous=FULL; then the C-STORE-RSP.
 * `--writeback` also starts the kernel's write-back of each fragment as it is written
 * (sync_file_range), so that the final fsync has less left to wait for.
 *
 * The question it answers: can any receiver reach 0.5x storescp's throughput on this machine with that
 * durability (issue 22, item 3)? benchmarks/receive.py --native runs it beside storescp and the node.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int writeback;
static const char *dir;
static int dir_fd;
static sqlite3 *db;
static sqlite3_stmt *insert;

static void die(const char *what) { perror(what); exit(1); }

static int read_all(int fd, uint8_t *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t k = recv(fd, buf + got, n - got, 0);
        if (k <= 0) return -1;
        got += (size_t)k;
    }
    return 0;
}

static void send_all(int fd, const uint8_t *buf, size_t n) {
    while (n) {
        ssize_t k = send(fd, buf, n, MSG_NOSIGNAL);
        if (k <= 0) return;
        buf += k; n -= (size_t)k;
    }
}

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put_be32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static void put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }

/* A-ASSOCIATE-AC for an A-ASSOCIATE-RQ body: every presentation context accepted with explicit VR
 * little endian when proposed, else its first transfer syntax. */
static size_t associate_ac(const uint8_t *rq, size_t len, uint8_t *ac) {
    static const char app[] = "1.2.840.10008.3.1.1.1", impl[] = "1.2.826.0.1.3680043.9.7433.1", elx[] = "1.2.840.10008.1.2.1";
    size_t o = 6;
    memcpy(ac + o, rq, 68); o += 68;  /* version, reserved, called, calling, reserved: as asked */
    ac[o] = 0x10; ac[o + 1] = 0; put_be16(ac + o + 2, sizeof app - 1); memcpy(ac + o + 4, app, sizeof app - 1);
    o += 4 + sizeof app - 1;
    for (size_t p = 68; p + 4 <= len;) {
        uint8_t type = rq[p]; uint16_t ilen = be16(rq + p + 2);
        if (type == 0x20) {
            const uint8_t *ts = NULL; uint16_t tslen = 0;
            for (size_t q = p + 8; q + 4 <= p + 4 + ilen;) {
                uint16_t slen = be16(rq + q + 2);
                if (rq[q] == 0x40 && (!ts || (slen == sizeof elx - 1 && !memcmp(rq + q + 4, elx, slen)))) {
                    ts = rq + q + 4; tslen = slen;
                }
                q += 4 + slen;
            }
            ac[o] = 0x21; ac[o + 1] = 0; put_be16(ac + o + 2, (uint16_t)(4 + 4 + tslen));
            ac[o + 4] = rq[p + 4]; ac[o + 5] = 0; ac[o + 6] = 0; ac[o + 7] = 0;
            ac[o + 8] = 0x40; ac[o + 9] = 0; put_be16(ac + o + 10, tslen); memcpy(ac + o + 12, ts, tslen);
            o += 12 + tslen;
        }
        p += 4 + ilen;
    }
    ac[o] = 0x50; ac[o + 1] = 0; put_be16(ac + o + 2, (uint16_t)(8 + 4 + sizeof impl - 1));
    ac[o + 4] = 0x51; ac[o + 5] = 0; put_be16(ac + o + 6, 4); put_be32(ac + o + 8, 262144);
    ac[o + 12] = 0x52; ac[o + 13] = 0; put_be16(ac + o + 14, sizeof impl - 1); memcpy(ac + o + 16, impl, sizeof impl - 1);
    o += 16 + sizeof impl - 1;
    ac[0] = 2; ac[1] = 0; put_be32(ac + 2, (uint32_t)(o - 6));
    return o;
}

/* one element of an implicit VR little endian command set */
static size_t element(uint8_t *p, uint16_t el, const void *v, uint32_t n) {
    p[0] = 0; p[1] = 0; p[2] = el & 0xff; p[3] = el >> 8;
    p[4] = n & 0xff; p[5] = n >> 8; p[6] = n >> 16; p[7] = n >> 24;
    memcpy(p + 8, v, n);
    return 8 + n;
}

static void respond(int s, uint8_t pc, uint16_t field, uint16_t msg_id, const uint8_t *cls, uint32_t cls_len,
                    const uint8_t *inst, uint32_t inst_len, int with_instance) {
    uint8_t body[400], pdu[512];
    uint16_t none = 0x0101, status = 0;
    size_t n = 0;
    n += element(body + n, 0x0002, cls, cls_len);
    n += element(body + n, 0x0100, &field, 2);
    n += element(body + n, 0x0120, &msg_id, 2);
    n += element(body + n, 0x0800, &none, 2);
    n += element(body + n, 0x0900, &status, 2);
    if (with_instance) n += element(body + n, 0x1000, inst, inst_len);
    uint32_t glen = (uint32_t)n;
    size_t c = 6 + 4 + 2;
    c += element(pdu + c, 0x0000, &glen, 4);
    memcpy(pdu + c, body, n); c += n;
    pdu[0] = 4; pdu[1] = 0; put_be32(pdu + 2, (uint32_t)(c - 6));
    put_be32(pdu + 6, (uint32_t)(c - 10)); pdu[10] = pc; pdu[11] = 0x03;
    send_all(s, pdu, c);
}

static void serve(int s) {
    static uint8_t buf[1 << 20], ac[4096];
    static const uint8_t meta[132 + 64] = {0};  /* stands in for the preamble and file meta the node writes */
    uint8_t head[6], cls[65], inst[65];
    uint32_t cls_len = 0, inst_len = 0;
    uint16_t field = 0, msg_id = 0;
    int fd = -1, n_files = 0;
    char tmp[4200], final[4200];
    for (;;) {
        if (read_all(s, head, 6)) return;
        uint32_t len = be32(head + 2);
        if (len > sizeof buf || read_all(s, buf, len)) return;
        if (head[0] == 1) { send_all(s, ac, associate_ac(buf, len, ac)); continue; }
        if (head[0] == 5) { uint8_t rp[10] = {6, 0, 0, 0, 0, 4, 0, 0, 0, 0}; send_all(s, rp, 10); return; }
        if (head[0] != 4) return;
        for (size_t p = 0; p + 6 <= len;) {
            uint32_t ilen = be32(buf + p);
            uint8_t pc = buf[p + 4], control = buf[p + 5];
            const uint8_t *v = buf + p + 6;
            uint32_t vlen = ilen - 2;
            if (control & 1) {  /* a whole command set in one fragment */
                for (uint32_t q = 0; q + 8 <= vlen;) {
                    uint16_t el = (uint16_t)(v[q + 2] | v[q + 3] << 8);
                    uint32_t n = v[q + 4] | v[q + 5] << 8 | v[q + 6] << 16 | (uint32_t)v[q + 7] << 24;
                    const uint8_t *x = v + q + 8;
                    if (el == 0x0002 && n < sizeof cls) { memcpy(cls, x, n); cls_len = n; }
                    if (el == 0x1000 && n < sizeof inst) { memcpy(inst, x, n); inst_len = n; }
                    if (el == 0x0100) field = (uint16_t)(x[0] | x[1] << 8);
                    if (el == 0x0110) msg_id = (uint16_t)(x[0] | x[1] << 8);
                    q += 8 + n;
                }
                if (field == 0x0030) respond(s, pc, 0x8030, msg_id, cls, cls_len, NULL, 0, 0);  /* C-ECHO */
                else {
                    snprintf(tmp, sizeof tmp, "%s/.incoming-%d.tmp", dir, n_files);
                    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                    if (fd < 0) die("open");
                    if (write(fd, meta, sizeof meta) != (ssize_t)sizeof meta) die("write");
                }
            } else {
                off_t at = lseek(fd, 0, SEEK_CUR);
                if (write(fd, v, vlen) != (ssize_t)vlen) die("write");
                if (writeback) sync_file_range(fd, at, vlen, SYNC_FILE_RANGE_WRITE);
                if (control & 2) {  /* the last fragment: make it durable, then answer */
                    if (fsync(fd)) die("fsync");
                    close(fd);
                    inst[inst_len] = 0;
                    while (inst_len && inst[inst_len - 1] == 0) inst_len--;
                    snprintf(final, sizeof final, "%s/%.*s.dcm", dir, (int)inst_len, inst);
                    if (rename(tmp, final)) die("rename");
                    if (fsync(dir_fd)) die("fsync dir");
                    sqlite3_bind_text(insert, 1, (const char *)inst, (int)inst_len, SQLITE_STATIC);
                    sqlite3_bind_text(insert, 2, final, -1, SQLITE_STATIC);
                    if (sqlite3_step(insert) != SQLITE_DONE) die("insert");
                    sqlite3_reset(insert);
                    n_files++;
                    if (inst_len % 2) inst[inst_len++] = 0;
                    respond(s, pc, 0x8001, msg_id, cls, cls_len, inst, inst_len, 1);
                }
            }
            p += 4 + ilen;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: durable_scp PORT DIR [--writeback]\n"); return 2; }
    dir = argv[2];
    writeback = argc > 3 && !strcmp(argv[3], "--writeback");
    dir_fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dir_fd < 0) die(dir);
    char path[4200];
    snprintf(path, sizeof path, "%s/state.sqlite", dir);
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                         "CREATE TABLE IF NOT EXISTS instances(sop_uid TEXT PRIMARY KEY, path TEXT)", 0, 0, 0) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO instances VALUES (?, ?)", -1, &insert, 0) != SQLITE_OK)
        die("sqlite");
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) die("listen");
    for (;;) {
        int s = accept(l, NULL, NULL);
        if (s < 0) continue;
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        serve(s);
        close(s);
    }
}
