/*
 * msb-agent: PID 1 and guest agent of pytest-microsandbox.
 *
 * As PID 1 (getpid() == 1) it assembles the root filesystem described on the
 * kernel command line, then serves the wire protocol of docs/protocol.md over
 * the virtio-serial port named "msb.agent".  With --serve-fd N or
 * --serve-unix PATH it skips all of that and serves on the given descriptor,
 * running commands directly on the host; that is how the protocol is tested
 * without a VM.
 *
 * The agent is one single-threaded poll() loop.  Output to the host is
 * queued in one buffer (frames are built in place); when that queue is
 * large, the agent stops reading producers (child pipes, FS_READ files) so
 * memory stays bounded, and resumes them all together once the host has
 * caught up, so no single request can starve the others.
 *
 * Everything the host sends is parsed strictly; a malformed frame is logged
 * and answered with ERROR where that cannot confuse a live request.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <limits.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Loop devices (named volumes: an ext4 image file on a 9p share). Defined
 * here, as musl's headers carry no <linux/loop.h>; values from the kernel ABI. */
#define MSB_LOOP_CTL_GET_FREE 0x4C82
#define MSB_LOOP_CONFIGURE 0x4C0A
#define MSB_LO_FLAGS_READ_ONLY 1u
#define MSB_LO_FLAGS_AUTOCLEAR 4u
struct msb_loop_info64 {
	uint64_t lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit;
	uint32_t lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags;
	uint8_t lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32];
	uint64_t lo_init[2];
};
struct msb_loop_config {
	uint32_t fd, block_size;
	struct msb_loop_info64 info;
	uint64_t reserved[8];
};

#define PROTO_VERSION 1
#define AGENT_VERSION "1.0.0"
#define MAX_FRAME (1048576u + 65536u)
#define CHUNK 1048576u
#define OUTQ_HIGH (4u << 20)   /* pause producers while this much is queued */
#define MAX_REQS 1024          /* live requests (execs, transfers) */
#define FS_READ_BURST 4        /* chunks per FS_READ per loop iteration */
#define PIPE_DEFAULT 65536u   /* a new pipe's capacity (16 pages) */
#define DRAIN_READS 16         /* reads per pipe after reaping (grandchildren may never stop) */
#define PORT_NAME "msb.agent"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MODULE_INIT_COMPRESSED_FILE 4
/* <linux/random.h> is not available to musl-gcc: _IOW('R', 0x03, int[2]). */
#define MSB_RNDADDENTROPY _IOW('R', 0x03, int[2])
/* _IO('R', 0x07): make the CRNG use the new entropy now, not at its next timed
 * reseed; otherwise clones of one template can read the same urandom bytes. */
#define MSB_RNDRESEEDCRNG _IO('R', 0x07)

enum tag {
	T_VERSION = 1, T_ARG = 2, T_ENV = 3, T_CWD = 4, T_USER = 5, T_TIMEOUT_MS = 7,
	T_STDIN_MODE = 8, T_DATA = 9, T_SIGNAL = 10, T_PATH = 11, T_PATH2 = 12, T_MODE = 13,
	T_FLAGS = 14, T_PID = 15, T_EXIT_CODE = 16, T_TERM_SIGNAL = 17, T_TIMED_OUT = 18,
	T_ERRNO = 19, T_MESSAGE = 20, T_NAME = 21, T_KIND = 22, T_SIZE = 23, T_MTIME_NS = 24,
	T_FSTYPE = 25, T_OPTIONS = 26, T_SOURCE = 27, T_TIME_NS = 28, T_SEED = 29,
	T_AGENT_VERSION = 30, T_HOSTNAME = 31, T_UID = 32, T_GID = 33, T_OFFSET = 34,
	T_ROWS = 35, T_COLS = 36, T_WINDOW = 37, T_UPTIME_MS = 40,
	T_MEM_TOTAL = 41, T_MEM_AVAILABLE = 42, T_CPU_BUSY_MS = 43, T_CPU_IDLE_MS = 44,
	T_NPROCS = 45, T_LOAD1_MILLI = 46, T_NET = 47,
};

enum mtype {
	M_READY = 0x01, M_LOG = 0x02, M_HELLO = 0x03, M_PING = 0x04, M_SHUTDOWN = 0x05,
	M_CONFIGURE = 0x06, M_METRICS = 0x07, M_MOUNT = 0x08, M_UMOUNT = 0x09, M_NET = 0x0A,
	M_EXEC = 0x10, M_STDIN = 0x11, M_SIGNAL = 0x12, M_RESIZE = 0x13, M_ACK = 0x14,
	M_FS_READ = 0x20, M_FS_WRITE = 0x21, M_FS_CHUNK = 0x22, M_FS_END = 0x23,
	M_FS_LIST = 0x24, M_FS_STAT = 0x25, M_FS_MKDIR = 0x26, M_FS_REMOVE = 0x27,
	M_FS_RENAME = 0x28, M_FS_CHMOD = 0x29, M_FS_COPY = 0x2A, M_FS_READLINK = 0x2B,
	M_STARTED = 0x90, M_STDOUT = 0x91, M_STDERR = 0x92, M_EXITED = 0x93, M_DIRENT = 0xA2,
	M_OK = 0xF0, M_ERROR = 0xF1,
};

enum { K_UNKNOWN, K_INT, K_BYTES, K_REPEATED };

static int tag_kind(uint8_t tag)
{
	switch (tag) {
	case T_ARG: case T_ENV:
		return K_REPEATED;
	case T_CWD: case T_USER: case T_DATA: case T_PATH: case T_PATH2: case T_MESSAGE:
	case T_NAME: case T_FSTYPE: case T_OPTIONS: case T_SOURCE: case T_SEED:
	case T_AGENT_VERSION: case T_HOSTNAME: case T_NET:
		return K_BYTES;
	case T_VERSION: case T_TIMEOUT_MS: case T_STDIN_MODE: case T_SIGNAL: case T_MODE:
	case T_FLAGS: case T_PID: case T_EXIT_CODE: case T_TERM_SIGNAL: case T_TIMED_OUT:
	case T_ERRNO: case T_KIND: case T_SIZE: case T_MTIME_NS: case T_TIME_NS: case T_UID:
	case T_GID: case T_OFFSET: case T_ROWS: case T_COLS: case T_WINDOW: case T_UPTIME_MS: case T_MEM_TOTAL: case T_MEM_AVAILABLE:
	case T_CPU_BUSY_MS: case T_CPU_IDLE_MS: case T_NPROCS: case T_LOAD1_MILLI:
		return K_INT;
	default:
		return K_UNKNOWN;
	}
}

static bool pid1;
static struct rlimit nofile_orig; /* the agent raises its own; children get the original */
static int port_fd = -1;
static int64_t port_backoff_until; /* virtio port has no host connected: retry later */

/* ------------------------------------------------------------------ utils */

static int64_t clock_ms(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static void write_all_fd(int fd, const char *s, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, s, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

/* Reads a small (sysfs/proc) file, NUL-terminated, trailing whitespace cut. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t n = 0;
	while (n + 1 < cap) {
		ssize_t r = read(fd, buf + n, cap - 1 - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
		n--;
	buf[n] = 0;
	return (ssize_t)n;
}

static void poweroff(void) __attribute__((noreturn));
static void poweroff(void)
{
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause(); /* PID 1 must never exit: that panics the kernel */
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	write_all_fd(2, "msb-agent: fatal: ", 18);
	write_all_fd(2, buf, (size_t)n);
	if (!pid1)
		exit(1);
	int c = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (c >= 0) {
		write_all_fd(c, "msb-agent: fatal: ", 18);
		write_all_fd(c, buf, (size_t)n);
		close(c);
	}
	poweroff();
}

/* ------------------------------------------------------- output queue
 * Frames are built directly in the queue: msg_begin() reserves the header,
 * f_*() append fields, msg_end() patches the length.  Offsets, not pointers,
 * survive reallocation; the queue is only compacted in ob_flush(), never
 * while a frame is being built. */

static void kill_all_execs(void);

static struct {
	uint8_t *buf;
	size_t off, len, cap;
	size_t frame;      /* start of the frame being built */
	bool building;
} ob;

static size_t ob_pending(void) { return ob.len - ob.off; }

static void ob_reserve(size_t n)
{
	if (ob.len + n <= ob.cap)
		return;
	size_t cap = ob.cap ? ob.cap : 65536;
	while (cap < ob.len + n)
		cap *= 2;
	uint8_t *b = realloc(ob.buf, cap);
	if (!b)
		die("out of memory (output queue of %zu bytes)", cap);
	ob.buf = b;
	ob.cap = cap;
}

static void msg_begin(uint32_t id, uint8_t type)
{
	ob_reserve(9);
	ob.frame = ob.len;
	ob.building = true;
	put_be32(ob.buf + ob.len + 4, id);
	ob.buf[ob.len + 8] = type;
	ob.len += 9;
}

static void msg_end(void)
{
	put_be32(ob.buf + ob.frame, (uint32_t)(ob.len - ob.frame - 4));
	ob.building = false;
}

static void msg_abort(void)
{
	ob.len = ob.frame;
	ob.building = false;
}

static void f_bytes(uint8_t tag, const void *p, size_t n)
{
	ob_reserve(5 + n);
	ob.buf[ob.len] = tag;
	put_be32(ob.buf + ob.len + 1, (uint32_t)n);
	if (n)
		memcpy(ob.buf + ob.len + 5, p, n);
	ob.len += 5 + n;
}

static void f_str(uint8_t tag, const char *s) { f_bytes(tag, s, strlen(s)); }

static void f_int(uint8_t tag, int64_t v)
{
	uint8_t b[8];
	uint64_t u = (uint64_t)v;
	for (int i = 7; i >= 0; i--, u >>= 8)
		b[i] = (uint8_t)u;
	f_bytes(tag, b, 8);
}

/* Appends a DATA frame read straight from fd.  Returns read()'s result. */
static ssize_t msg_read_data(uint32_t id, uint8_t type, int fd, size_t max)
{
	msg_begin(id, type);
	ob_reserve(5 + CHUNK);
	ssize_t n;
	do
		n = read(fd, ob.buf + ob.len + 5, max < CHUNK ? max : CHUNK);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		msg_abort();
		return n;
	}
	ob.buf[ob.len] = T_DATA;
	put_be32(ob.buf + ob.len + 1, (uint32_t)n);
	ob.len += 5 + (size_t)n;
	msg_end();
	return n;
}

static void ob_flush(void)
{
	while (ob.off < ob.len) {
		ssize_t n = write(port_fd, ob.buf + ob.off, ob.len - ob.off);
		if (n > 0) {
			ob.off += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		if (!pid1) { /* host mode: the peer went away */
			kill_all_execs();
			exit(0);
		}
		/* Guest: nothing sensible to do with the queue but drop it. */
		dprintf(2, "msb-agent: port write failed (%s); dropping %zu bytes\n",
			n < 0 ? strerror(errno) : "EOF", ob.len - ob.off);
		ob.off = ob.len;
	}
	if (ob.off == ob.len) {
		ob.off = ob.len = 0;
	} else if (ob.off > ob.cap / 2) {
		memmove(ob.buf, ob.buf + ob.off, ob.len - ob.off);
		ob.len -= ob.off;
		ob.off = 0;
	}
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	dprintf(2, "msb-agent: %s\n", buf);
	if (port_fd >= 0 && !ob.building) {
		msg_begin(0, M_LOG);
		f_bytes(T_MESSAGE, buf, (size_t)n);
		msg_end();
	}
}

static void reply_ok(uint32_t id)
{
	msg_begin(id, M_OK);
	msg_end();
}

static void reply_error(uint32_t id, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void reply_error(uint32_t id, int err, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	msg_begin(id, M_ERROR);
	f_int(T_ERRNO, err);
	f_bytes(T_MESSAGE, buf, (size_t)n);
	msg_end();
}

/* ---------------------------------------------------------- parsing */

struct msg {
	uint32_t id;
	uint8_t type;
	const uint8_t *pl;
	uint32_t pl_len;
};

static char perr[128];

/* Checks the field structure of a frame; returns NULL or a reason. */
static const char *validate(const struct msg *m)
{
	uint64_t seen = 0;
	uint32_t off = 0;
	while (off < m->pl_len) {
		if (m->pl_len - off < 5)
			return "truncated field header";
		uint8_t tag = m->pl[off];
		uint32_t len = be32(m->pl + off + 1);
		off += 5;
		if (len > m->pl_len - off) {
			snprintf(perr, sizeof perr, "field %u overruns the frame", tag);
			return perr;
		}
		int k = tag_kind(tag);
		if (k == K_INT && len != 8) {
			snprintf(perr, sizeof perr, "integer field %u has length %u", tag, len);
			return perr;
		}
		if (k == K_INT || k == K_BYTES) {
			uint64_t bit = 1ull << tag; /* every known tag is < 64 */
			if (seen & bit) {
				snprintf(perr, sizeof perr, "field %u given twice", tag);
				return perr;
			}
			seen |= bit;
		}
		off += len;
	}
	return NULL;
}

/* Iterates fields of a validated frame. */
static bool next_field(const struct msg *m, uint32_t *off, uint8_t *tag, const uint8_t **p, uint32_t *len)
{
	if (*off >= m->pl_len)
		return false;
	*tag = m->pl[*off];
	*len = be32(m->pl + *off + 1);
	*p = m->pl + *off + 5;
	*off += 5 + *len;
	return true;
}

static bool get_field(const struct msg *m, uint8_t want, const uint8_t **p, uint32_t *len)
{
	uint32_t off = 0;
	uint8_t tag;
	while (next_field(m, &off, &tag, p, len))
		if (tag == want)
			return true;
	return false;
}

static bool get_int(const struct msg *m, uint8_t tag, int64_t *v)
{
	const uint8_t *p;
	uint32_t n;
	if (!get_field(m, tag, &p, &n))
		return false;
	uint64_t u = 0;
	for (int i = 0; i < 8; i++)
		u = u << 8 | p[i];
	*v = (int64_t)u;
	return true;
}

static int64_t get_int_or(const struct msg *m, uint8_t tag, int64_t dflt)
{
	int64_t v;
	return get_int(m, tag, &v) ? v : dflt;
}

/* A malloc'ed C string copy of a bytes field, or NULL if it holds a NUL. */
static char *dup_cstr(const uint8_t *p, uint32_t n)
{
	if (memchr(p, 0, n))
		return NULL;
	char *s = malloc((size_t)n + 1);
	if (!s)
		die("out of memory");
	memcpy(s, p, n);
	s[n] = 0;
	return s;
}

/* Copies a required absolute path field into buf[PATH_MAX]; replies ERROR if not. */
static bool need_path(const struct msg *m, uint8_t tag, char *buf)
{
	const uint8_t *p;
	uint32_t n;
	const char *name = tag == T_PATH2 ? "PATH2" : "PATH";
	if (!get_field(m, tag, &p, &n)) {
		reply_error(m->id, EPROTO, "missing %s", name);
		return false;
	}
	if (n == 0 || n >= PATH_MAX || p[0] != '/' || memchr(p, 0, n)) {
		reply_error(m->id, EINVAL, "%s must be an absolute path without NUL bytes", name);
		return false;
	}
	memcpy(buf, p, n);
	buf[n] = 0;
	return true;
}

/* --------------------------------------------------------- requests */

enum { R_EXEC = 1, R_READ, R_WRITE, R_WRITE_FAILED, R_COPY };

struct req {
	uint32_t id;
	int kind;
	bool dead;           /* finished; freed at the end of the loop iteration */
	bool disowned;       /* exec of an earlier host session: runs on, reported to no one */
	/* exec */
	pid_t pid;
	int out_fd, err_fd, in_fd;  /* with a pty: out_fd and in_fd are the master */
	bool reaped, timed_out, in_eof, tty;
	bool big_pipes;      /* stdout/stderr pipes enlarged (the command writes a lot) */
	int status;
	int64_t deadline;    /* CLOCK_MONOTONIC ms, 0 = none */
	int64_t window;      /* output bytes sent and not yet ACKed, at most; 0 = no limit */
	int64_t unacked;
	uint8_t *inq;
	size_t inq_off, inq_len, inq_cap;
	/* FS_READ / FS_WRITE / FS_COPY (fd2: the copy's destination) */
	int fd, fd2;
	int64_t size;
	int64_t limit;       /* FS_COPY from a disk, FS_READ: bytes at most; -1 = to end of file */
};

static struct req *reqs[MAX_REQS];
static int nreqs;

static struct req *find_req(uint32_t id)
{
	for (int i = 0; i < nreqs; i++)
		if (!reqs[i]->dead && !reqs[i]->disowned && reqs[i]->id == id)
			return reqs[i];
	return NULL;
}

/* Whether another request can go live; if not, answers request ID EAGAIN. */
static bool req_slot_free(uint32_t id)
{
	if (nreqs < MAX_REQS)
		return true;
	reply_error(id, EAGAIN, "too many live requests");
	return false;
}

static struct req *new_req(uint32_t id, int kind)
{
	if (nreqs == MAX_REQS)
		return NULL;
	struct req *r = calloc(1, sizeof *r);
	if (!r)
		die("out of memory");
	r->id = id;
	r->kind = kind;
	r->out_fd = r->err_fd = r->in_fd = r->fd = r->fd2 = -1;
	r->limit = -1;
	reqs[nreqs++] = r;
	return r;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void release(struct req *r)
{
	close_fd(&r->out_fd);
	close_fd(&r->err_fd);
	close_fd(&r->in_fd);
	close_fd(&r->fd);
	close_fd(&r->fd2);
	free(r->inq);
	r->inq = NULL;
	r->dead = true;
}

static void sweep_reqs(void)
{
	int j = 0;
	for (int i = 0; i < nreqs; i++) {
		if (reqs[i]->dead)
			free(reqs[i]);
		else
			reqs[j++] = reqs[i];
	}
	nreqs = j;
}

/* ------------------------------------------------------------- exec */

enum { STAGE_CWD = 1, STAGE_USER, STAGE_EXEC, STAGE_SETUP };

struct child_report {
	int stage;
	int err;
};

struct exec_spec {
	char **argv, **envp;
	char *cwd;
	bool has_user;
	uid_t uid;
	gid_t gid;
	int in_r, out_w, err_w;
	bool tty; /* in_r = out_w = err_w = the pty's slave: make it the controlling tty */
	/* The agent's memory, shared with the vfork()ed child (the agent is
	 * suspended until the child execs or exits): where a child that cannot
	 * exec says why, instead of a report pipe (one pipe2, a read and two
	 * closes fewer per exec, each an emulated syscall under TCG). */
	volatile struct child_report *report;
};

/* stdin of a command without one; opened once (O_CLOEXEC: no child keeps it
 * but as its fd 0), instead of an open() per exec. */
static int devnull_fd = -1;

static void child_fail(const struct exec_spec *s, int stage, int err)
{
	s->report->err = err;
	s->report->stage = stage;
	_exit(127);
}

/* Runs in the vfork()ed child; never returns, touches only its own stack. */
static void child_exec(const struct exec_spec *s)
{
	sigset_t none;
	sigemptyset(&none);
	/* Handlers reset on exec by themselves; only an ignored disposition survives
	 * it, and SIGPIPE is the agent's only one. (Resetting all 64 signals cost
	 * ~1 ms of emulated syscalls per exec under TCG.) */
	signal(SIGPIPE, SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
	/* Raw syscalls from here on: this runs in a vfork() child sharing the
	 * agent's memory, and libc's set*id()/setrlimit() synchronise threads
	 * through shared state. */
	syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, &nofile_orig, NULL);
	setsid();
	if (s->tty && ioctl(s->in_r, TIOCSCTTY, 0) < 0)
		child_fail(s, STAGE_SETUP, errno);
	int in = s->in_r >= 0 ? s->in_r : devnull_fd;
	if (in < 0 || dup2(in, 0) < 0 || dup2(s->out_w, 1) < 0 || dup2(s->err_w, 2) < 0)
		child_fail(s, STAGE_SETUP, in < 0 ? ENOENT : errno);
	if (chdir(s->cwd) < 0)
		child_fail(s, STAGE_CWD, errno);
	if (s->has_user && (syscall(SYS_setgroups, 0, NULL) < 0 || syscall(SYS_setgid, s->gid) < 0 ||
			    syscall(SYS_setuid, s->uid) < 0))
		child_fail(s, STAGE_USER, errno);

	const char *prog = s->argv[0];
	if (prog[0] == 0)
		child_fail(s, STAGE_EXEC, ENOENT);
	if (strchr(prog, '/')) {
		execve(prog, s->argv, s->envp);
		child_fail(s, STAGE_EXEC, errno);
	}
	/* execvpe() semantics, but with PATH from the request's environment. */
	const char *path = DEFAULT_PATH;
	for (char **e = s->envp; *e; e++)
		if (strncmp(*e, "PATH=", 5) == 0)
			path = *e + 5;
	int err = ENOENT;
	char buf[PATH_MAX];
	for (const char *p = path;; p++) {
		const char *end = strchrnul(p, ':');
		size_t dl = (size_t)(end - p);
		int n = dl ? snprintf(buf, sizeof buf, "%.*s/%s", (int)dl, p, prog)
			   : snprintf(buf, sizeof buf, "%s", prog);
		/* access() first: a failed execve() per PATH entry costs more under TCG. */
		if (n > 0 && (size_t)n < sizeof buf && access(buf, F_OK) == 0) {
			execve(buf, s->argv, s->envp);
			if (errno == EACCES)
				err = EACCES;
			else if (errno != ENOENT && errno != ENOTDIR)
				child_fail(s, STAGE_EXEC, errno);
		}
		if (*end == 0)
			break;
		p = end;
	}
	child_fail(s, STAGE_EXEC, err);
}

static bool all_digits(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return true;
}

/* Looks up USER ("name", "uid" or "uid:gid") in /etc/passwd without NSS. */
static int resolve_user(const char *spec, uid_t *uid, gid_t *gid)
{
	char name[256];
	const char *colon = strchr(spec, ':');
	if (colon) {
		size_t ul = (size_t)(colon - spec);
		if (ul >= sizeof name)
			return -1;
		memcpy(name, spec, ul);
		name[ul] = 0;
		if (!all_digits(name) || !all_digits(colon + 1))
			return -1;
		*uid = (uid_t)strtoul(name, NULL, 10);
		*gid = (gid_t)strtoul(colon + 1, NULL, 10);
		return 0;
	}
	bool numeric = all_digits(spec);
	if (numeric)
		*uid = *gid = (uid_t)strtoul(spec, NULL, 10); /* gid = uid unless passwd says otherwise */
	FILE *f = fopen("/etc/passwd", "re");
	if (!f)
		return numeric ? 0 : -1;
	char line[1024];
	int found = numeric ? 0 : -1;
	while (fgets(line, sizeof line, f)) {
		/* name:password:uid:gid:gecos:home:shell */
		char *fields[4];
		char *p = line;
		int i;
		for (i = 0; i < 4; i++) {
			fields[i] = p;
			p = strchr(p, ':');
			if (!p)
				break;
			*p++ = 0;
		}
		if (i < 4 || !all_digits(fields[2]) || !all_digits(fields[3]))
			continue;
		bool match = numeric ? strtoul(fields[2], NULL, 10) == (unsigned long)*uid
				     : strcmp(fields[0], spec) == 0;
		if (match) {
			*uid = (uid_t)strtoul(fields[2], NULL, 10);
			*gid = (gid_t)strtoul(fields[3], NULL, 10);
			found = 0;
			break;
		}
	}
	fclose(f);
	return found;
}

static void free_strv(char **v)
{
	if (!v)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

/* Collects every field with `tag` as a NULL-terminated string vector. */
static char **collect_strv(const struct msg *m, uint8_t want, size_t *count, bool *bad)
{
	size_t n = 0;
	uint32_t off = 0;
	uint8_t tag;
	const uint8_t *p;
	uint32_t len;
	while (next_field(m, &off, &tag, &p, &len))
		n += tag == want;
	char **v = calloc(n + 1, sizeof *v);
	if (!v)
		die("out of memory");
	size_t i = 0;
	off = 0;
	while (next_field(m, &off, &tag, &p, &len)) {
		if (tag != want)
			continue;
		if (!(v[i] = dup_cstr(p, len))) {
			*bad = true;
			break;
		}
		i++;
	}
	*count = n;
	return v;
}

/* A pty pair: the master (non-blocking, CLOEXEC) and its slave (CLOEXEC; dup2()
 * in the child clears that), sized rows x cols. /dev/pts is a private devpts
 * instance mounted at boot. */
static int open_pty(int *master, int *slave, int64_t rows, int64_t cols)
{
	*master = *slave = -1;
	int mfd = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
	if (mfd < 0)
		mfd = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
	if (mfd < 0)
		return -1;
	int unlock = 0;
	struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	if (ioctl(mfd, TIOCSPTLCK, &unlock) < 0 || ioctl(mfd, TIOCSWINSZ, &ws) < 0)
		goto fail;
	/* TIOCGPTPEER opens the slave through the master: no path lookup. */
	int sfd = ioctl(mfd, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (sfd < 0)
		goto fail;
	*master = mfd;
	*slave = sfd;
	return 0;
fail:;
	int err = errno;
	close(mfd);
	errno = err;
	return -1;
}

static bool valid_size(int64_t v) { return v >= 1 && v <= 0xFFFF; }

static void h_exec(const struct msg *m)
{
	size_t argc = 0, envc = 0;
	bool bad = false;
	char **argv = collect_strv(m, T_ARG, &argc, &bad);
	char **envp = collect_strv(m, T_ENV, &envc, &bad);
	char *cwd = NULL, *user = NULL;
	volatile struct child_report rep = {0, 0};
	struct exec_spec s = {.argv = argv, .envp = envp, .in_r = -1, .out_w = -1, .err_w = -1, .report = &rep};
	int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr_[2] = {-1, -1};
	const uint8_t *p;
	uint32_t n;
	int64_t timeout = get_int_or(m, T_TIMEOUT_MS, 0);
	int64_t stdin_mode = get_int_or(m, T_STDIN_MODE, 0);
	int64_t rows = get_int_or(m, T_ROWS, 0), cols = get_int_or(m, T_COLS, 0);
	int64_t window = get_int_or(m, T_WINDOW, 0);
	bool tty = rows != 0 || cols != 0;
	int ptm = -1, pts = -1;

	if (bad) {
		reply_error(m->id, EINVAL, "ARG and ENV must not contain NUL bytes");
		goto out;
	}
	if (argc == 0) {
		reply_error(m->id, EPROTO, "EXEC needs at least one ARG");
		goto out;
	}
	if (timeout < 0 || (stdin_mode != 0 && stdin_mode != 1)) {
		reply_error(m->id, EINVAL, "invalid TIMEOUT_MS or STDIN_MODE");
		goto out;
	}
	if (window < 0) {
		reply_error(m->id, EINVAL, "invalid WINDOW");
		goto out;
	}
	if (tty && (!valid_size(rows) || !valid_size(cols))) {
		reply_error(m->id, EINVAL, "ROWS and COLS must both be 1..65535");
		goto out;
	}
	cwd = get_field(m, T_CWD, &p, &n) ? dup_cstr(p, n) : strdup("/");
	if (!cwd || !*cwd) {
		reply_error(m->id, EINVAL, "invalid CWD");
		goto out;
	}
	if (get_field(m, T_USER, &p, &n)) {
		user = dup_cstr(p, n);
		if (!user || resolve_user(user, &s.uid, &s.gid) < 0) {
			reply_error(m->id, EINVAL, "unknown user: %.200s", user ? user : "(invalid)");
			goto out;
		}
		s.has_user = true;
	}
	if (!req_slot_free(m->id))
		goto out;
	if (tty) {
		if (open_pty(&ptm, &pts, rows, cols) < 0) {
			reply_error(m->id, errno, "pty: %s", strerror(errno));
			goto out;
		}
		s.in_r = s.out_w = s.err_w = pts;
		s.tty = true;
	} else {
		if (stdin_mode == 0 && devnull_fd < 0)
			devnull_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr_, O_CLOEXEC) < 0 ||
		    (stdin_mode == 1 && pipe2(pin, O_CLOEXEC) < 0)) {
			reply_error(m->id, errno, "pipe: %s", strerror(errno));
			goto out;
		}
		s.in_r = pin[0];
		s.out_w = pout[1];
		s.err_w = perr_[1];
	}
	s.cwd = cwd;
	/* vfork: no copy of the agent's page tables and no copy-on-write faults
	 * in the agent afterwards, which are costly under TCG; the agent waits
	 * (it would block on the report pipe anyway) until the child has exec'd. */
	pid_t pid = vfork();
	if (pid < 0) {
		reply_error(m->id, errno, "fork: %s", strerror(errno));
		goto out;
	}
	if (pid == 0)
		child_exec(&s);
	close_fd(&pts); /* the master reads EIO once the child's side is all closed */
	close_fd(&pin[0]);
	close_fd(&pout[1]);
	close_fd(&perr_[1]);

	/* vfork() returned: the child has exec'd, or set rep and exited. */
	if (rep.stage != 0) {
		waitpid(pid, NULL, 0);
		if (rep.stage == STAGE_EXEC && rep.err == ENOENT)
			reply_error(m->id, ENOENT, "command not found: %.200s", argv[0]);
		else if (rep.stage == STAGE_CWD)
			reply_error(m->id, rep.err, "cannot change directory to %.200s: %s", cwd, strerror(rep.err));
		else if (rep.stage == STAGE_USER)
			reply_error(m->id, rep.err, "cannot switch to user %.200s: %s", user, strerror(rep.err));
		else
			reply_error(m->id, rep.err, "cannot execute %.200s: %s", argv[0], strerror(rep.err));
		goto out;
	}

	struct req *q = new_req(m->id, R_EXEC);
	q->pid = pid;
	if (tty) {
		q->tty = true;
		q->out_fd = ptm;
		q->in_fd = fcntl(ptm, F_DUPFD_CLOEXEC, 0); /* closed apart from out_fd */
		ptm = -1;
		if (q->in_fd < 0)
			logmsg("pty of id %u: no input (dup: %s)", m->id, strerror(errno));
	} else {
		q->out_fd = pout[0];
		q->err_fd = perr_[0];
		q->in_fd = pin[1];
		pout[0] = perr_[0] = pin[1] = -1;
		fcntl(q->out_fd, F_SETFL, O_NONBLOCK);
		fcntl(q->err_fd, F_SETFL, O_NONBLOCK);
	}
	if (q->in_fd >= 0)
		fcntl(q->in_fd, F_SETFL, O_NONBLOCK);
	if (timeout > 0)
		q->deadline = clock_ms(CLOCK_MONOTONIC) + timeout;
	q->window = window;
	msg_begin(m->id, M_STARTED);
	f_int(T_PID, pid);
	msg_end();
out:
	for (int i = 0; i < 2; i++) {
		close_fd(&pin[i]);
		close_fd(&pout[i]);
		close_fd(&perr_[i]);
	}
	close_fd(&ptm);
	close_fd(&pts);
	free_strv(argv);
	free_strv(envp);
	free(cwd);
	free(user);
}

static void stdin_flush(struct req *r)
{
	while (r->in_fd >= 0 && r->inq_off < r->inq_len) {
		ssize_t n = write(r->in_fd, r->inq + r->inq_off, r->inq_len - r->inq_off);
		if (n > 0) {
			r->inq_off += (size_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			return;
		} else { /* EPIPE: the child closed its stdin; drop the rest */
			close_fd(&r->in_fd);
		}
	}
	r->inq_off = r->inq_len = 0;
	if (r->in_eof)
		close_fd(&r->in_fd);
}

static void h_stdin(const struct msg *m, struct req *r)
{
	const uint8_t *p;
	uint32_t n;
	if (!r || r->kind != R_EXEC || r->in_fd < 0 || r->in_eof)
		return; /* after exit, closed, or not a pipe: ignored by design */
	if (!get_field(m, T_DATA, &p, &n)) {
		logmsg("STDIN for id %u without DATA ignored", m->id);
		return;
	}
	if (n == 0) {
		if (!r->tty) /* a terminal has no EOF to close: its ^D is data */
			r->in_eof = true;
	} else {
		if (r->inq_off > 0) {
			memmove(r->inq, r->inq + r->inq_off, r->inq_len - r->inq_off);
			r->inq_len -= r->inq_off;
			r->inq_off = 0;
		}
		if (r->inq_len + n > r->inq_cap) {
			size_t cap = r->inq_len + n + 65536;
			uint8_t *b = realloc(r->inq, cap);
			if (!b)
				die("out of memory (stdin buffer)");
			r->inq = b;
			r->inq_cap = cap;
		}
		memcpy(r->inq + r->inq_len, p, n);
		r->inq_len += n;
	}
	stdin_flush(r);
}

static void h_signal(const struct msg *m, struct req *r)
{
	int64_t sig;
	if (!r || r->kind != R_EXEC || r->reaped)
		return;
	if (!get_int(m, T_SIGNAL, &sig) || sig <= 0 || sig >= NSIG) {
		logmsg("SIGNAL for id %u without a valid signal number ignored", m->id);
		return;
	}
	kill(-r->pid, (int)sig);
}

/* Bigger pipes mean fewer wakeups for chatty commands; best effort. Done
 * once a read finds a pipe full, not per exec: growing a pipe to CHUNK costs
 * an allocation most commands (a few lines of output) never need. */
static void enlarge_pipes(struct req *r)
{
	r->big_pipes = true;
	if (r->out_fd >= 0)
		fcntl(r->out_fd, F_SETPIPE_SZ, (int)CHUNK);
	if (r->err_fd >= 0)
		fcntl(r->err_fd, F_SETPIPE_SZ, (int)CHUNK);
}

static void h_resize(const struct msg *m, struct req *r)
{
	int64_t rows, cols;
	if (!r || r->kind != R_EXEC || !r->tty || r->reaped || r->out_fd < 0)
		return;
	if (!get_int(m, T_ROWS, &rows) || !get_int(m, T_COLS, &cols) || !valid_size(rows) ||
	    !valid_size(cols)) {
		logmsg("RESIZE for id %u without valid ROWS and COLS ignored", m->id);
		return;
	}
	/* The kernel sends SIGWINCH to the terminal's foreground process group. */
	struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	if (ioctl(r->out_fd, TIOCSWINSZ, &ws) < 0)
		logmsg("RESIZE for id %u: %s", m->id, strerror(errno));
}

/* The host consumed SIZE bytes of an exec's output: that much more may be sent. */
static void h_ack(const struct msg *m, struct req *r)
{
	int64_t n;
	if (!r || r->kind != R_EXEC)
		return;
	if (!get_int(m, T_SIZE, &n) || n < 0) {
		logmsg("ACK for id %u without a valid SIZE ignored", m->id);
		return;
	}
	r->unacked = n >= r->unacked ? 0 : r->unacked - n;
}

/* Bytes of output an exec may send now. */
static size_t out_room(const struct req *r)
{
	if (!r->window)
		return CHUNK;
	int64_t room = r->window - r->unacked;
	return room <= 0 ? 0 : room < (int64_t)CHUNK ? (size_t)room : CHUNK;
}

/* Called once the exec's child is reaped: forward what is left in the
 * pipes, then report the exit.  Bounded, since orphaned grandchildren may
 * hold the pipes open and keep writing. */
static void exec_finish(struct req *r)
{
	/* With a window, each read takes at most a window's worth: what the host
	 * may hold unacknowledged is bounded by (1 + DRAIN_READS) windows. */
	size_t max = r->window && r->window < (int64_t)CHUNK ? (size_t)r->window : CHUNK;
	for (int i = 0; i < DRAIN_READS && r->out_fd >= 0; i++)
		if (msg_read_data(r->id, M_STDOUT, r->out_fd, max) <= 0)
			break;
	for (int i = 0; i < DRAIN_READS && r->err_fd >= 0; i++)
		if (msg_read_data(r->id, M_STDERR, r->err_fd, max) <= 0)
			break;
	msg_begin(r->id, M_EXITED);
	if (WIFEXITED(r->status))
		f_int(T_EXIT_CODE, WEXITSTATUS(r->status));
	else
		f_int(T_TERM_SIGNAL, WTERMSIG(r->status));
	f_int(T_TIMED_OUT, r->timed_out);
	msg_end();
	release(r);
}

static void reap_children(int sig_fd)
{
	struct signalfd_siginfo si;
	while (read(sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
		/* only a wakeup; waitpid() below finds every exited child */
	}
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, WNOHANG);
		if (pid <= 0)
			break;
		for (int i = 0; i < nreqs; i++) {
			struct req *r = reqs[i];
			if (!r->dead && r->kind == R_EXEC && r->pid == pid) {
				r->reaped = true;
				r->status = st;
				if (r->disowned)
					release(r); /* its output went nowhere; so does its exit */
				else
					exec_finish(r);
				break;
			}
		}
		/* anything else is an orphan PID 1 inherited: reaped, nothing to report */
	}
}

/* A HELLO starts a new host session: the first request after a restore
 * (snapshot, fork, template clone) or any reconnection.  Requests still live
 * belong to the host session the guest was captured with, whose ids the new
 * host reuses: their transfers end, and their commands go on running (they
 * are part of the captured guest, as a forked VM keeps its processes) but are
 * disowned: their ids are free again, their stdin is closed, their output is
 * read and dropped, their exit reaped silently. */
static void disown_requests(void)
{
	int n = 0;
	for (int i = 0; i < nreqs; i++) {
		struct req *r = reqs[i];
		if (r->dead || r->disowned)
			continue;
		n++;
		if (r->kind != R_EXEC) {
			release(r);
			continue;
		}
		r->disowned = true;
		r->window = 0; /* nobody ACKs any more: keep draining */
		close_fd(&r->in_fd);
		free(r->inq);
		r->inq = NULL;
		r->inq_off = r->inq_len = r->inq_cap = 0;
	}
	if (n)
		logmsg("new host session: %d request(s) of the previous one disowned", n);
}

/* Reads and drops a disowned exec's output; closes the fd at its end. */
static void discard_output(int *fd)
{
	static uint8_t sink[65536];
	ssize_t n;
	do
		n = read(*fd, sink, sizeof sink);
	while (n < 0 && errno == EINTR);
	if (n == 0 || (n < 0 && errno != EAGAIN))
		close_fd(fd);
}

static void kill_all_execs(void)
{
	for (int i = 0; i < nreqs; i++)
		if (!reqs[i]->dead && reqs[i]->kind == R_EXEC && !reqs[i]->reaped)
			kill(-reqs[i]->pid, SIGKILL);
}

/* --------------------------------------------------------------- fs */

static int kind_of(mode_t mode)
{
	return S_ISREG(mode) ? 1 : S_ISDIR(mode) ? 2 : S_ISLNK(mode) ? 3 : 4;
}

static int64_t mtime_ns(const struct stat *st)
{
	return (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
}

/* mkdir -p.  Returns 1 if the final directory was created, 0 if it existed. */
static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	snprintf(buf, sizeof buf, "%s", path);
	int created = 0;
	for (char *p = buf + 1;; p++) {
		if (*p != '/' && *p != 0)
			continue;
		char c = *p;
		*p = 0;
		if (mkdir(buf, c ? 0755 : mode) == 0)
			created = !c;
		else if (errno != EEXIST)
			return -1;
		*p = c;
		if (!c)
			break;
	}
	struct stat st;
	if (stat(path, &st) < 0)
		return -1;
	if (!S_ISDIR(st.st_mode)) {
		errno = EEXIST;
		return -1;
	}
	return created;
}

static int mkdir_parents(const char *path)
{
	char buf[PATH_MAX];
	snprintf(buf, sizeof buf, "%s", path);
	char *slash = strrchr(buf, '/');
	if (!slash || slash == buf)
		return 0;
	*slash = 0;
	return mkdir_p(buf, 0755) < 0 ? -1 : 0;
}

/* Opens a regular file for reading, or replies ERROR for request ``id`` and returns -1. */
static int open_regular(uint32_t id, const char *path)
{
	/* O_NONBLOCK: opening a FIFO must not hang the agent (it is refused below). */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		reply_error(id, e, "%s: %s", path, strerror(e));
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		close(fd);
		reply_error(id, e, "%s: %s", path, e == EISDIR ? strerror(e) : "not a regular file");
		return -1;
	}
	return fd;
}

static void h_fs_read(const struct msg *m)
{
	char path[PATH_MAX];
	if (!need_path(m, T_PATH, path))
		return;
	/* OFFSET and SIZE read a window of the file (the host streams big files
	 * window by window, so its memory holds one window at a time). */
	int64_t offset = get_int_or(m, T_OFFSET, 0), limit = get_int_or(m, T_SIZE, -1);
	if (offset < 0 || limit < -1) {
		reply_error(m->id, EPROTO, "FS_READ needs OFFSET >= 0 and SIZE >= 0");
		return;
	}
	int fd = open_regular(m->id, path);
	if (fd < 0)
		return;
	if (offset > 0 && lseek(fd, (off_t)offset, SEEK_SET) < 0) {
		int e = errno;
		close(fd);
		reply_error(m->id, e, "%s: %s", path, strerror(e));
		return;
	}
	struct req *r = new_req(m->id, R_READ);
	if (!r) {
		close(fd);
		reply_error(m->id, EAGAIN, "too many live requests");
		return;
	}
	r->fd = fd; /* streamed by fs_read_step() from the loop */
	r->limit = limit;
}

static void fs_read_step(struct req *r)
{
	for (int i = 0; i < FS_READ_BURST && ob_pending() < OUTQ_HIGH; i++) {
		size_t max = CHUNK;
		if (r->limit >= 0 && r->limit - r->size < (int64_t)CHUNK)
			max = (size_t)(r->limit - r->size);
		ssize_t n = max == 0 ? 0 : msg_read_data(r->id, M_FS_CHUNK, r->fd, max);
		if (n > 0) {
			r->size += n;
			continue;
		}
		if (n < 0) {
			reply_error(r->id, errno, "read: %s", strerror(errno));
		} else {
			msg_begin(r->id, M_OK);
			f_int(T_SIZE, r->size);
			msg_end();
		}
		release(r);
		return;
	}
}

static void h_fs_write(const struct msg *m)
{
	char path[PATH_MAX];
	if (!need_path(m, T_PATH, path))
		return;
	int64_t flags = get_int_or(m, T_FLAGS, 0), mode;
	bool has_mode = get_int(m, T_MODE, &mode);
	if (!req_slot_free(m->id))
		return;
	if ((flags & 1) && mkdir_parents(path) < 0) {
		reply_error(m->id, errno, "cannot create parents of %s: %s", path, strerror(errno));
		return;
	}
	/* O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of hanging the agent. */
	int oflags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NONBLOCK | ((flags & 2) ? O_APPEND : O_TRUNC);
	int fd = open(path, oflags, has_mode ? (mode_t)(mode & 07777) : 0644);
	if (fd < 0) {
		reply_error(m->id, errno, "%s: %s", path, strerror(errno));
		return;
	}
	/* An explicit MODE is exact: not reduced by the umask, applied to existing files too. */
	if (has_mode && fchmod(fd, (mode_t)(mode & 07777)) < 0) {
		int e = errno;
		close(fd);
		reply_error(m->id, e, "chmod %s: %s", path, strerror(e));
		return;
	}
	struct req *r = new_req(m->id, R_WRITE);
	r->fd = fd;
	reply_ok(m->id);
}

static void fail_write(struct req *r, int err, const char *what)
{
	reply_error(r->id, err, "%s: %s", what, err == EPROTO ? "protocol error" : strerror(err));
	close_fd(&r->fd);
	r->kind = R_WRITE_FAILED; /* swallow the rest of this transfer */
}

static void h_fs_chunk(const struct msg *m, struct req *r)
{
	const uint8_t *p;
	uint32_t n;
	if (!r || r->kind == R_WRITE_FAILED)
		return;
	if (r->kind != R_WRITE) {
		logmsg("FS_CHUNK for id %u, which is not an FS_WRITE, ignored", m->id);
		return;
	}
	if (!get_field(m, T_DATA, &p, &n)) {
		fail_write(r, EPROTO, "FS_CHUNK without DATA");
		return;
	}
	while (n > 0) {
		ssize_t w = write(r->fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			fail_write(r, errno, "write");
			return;
		}
		p += w;
		n -= (uint32_t)w;
		r->size += w;
	}
}

static void h_fs_end(const struct msg *m, struct req *r)
{
	if (!r)
		return;
	if (r->kind == R_WRITE_FAILED) {
		release(r);
		return;
	}
	if (r->kind == R_READ) {
		/* The host gave up on this read (its size limit, a timeout): stop
		 * streaming, or an endless file (/proc/kcore) would go on forever. */
		reply_error(r->id, ECANCELED, "read cancelled by the host after %lld bytes",
			    (long long)r->size);
		release(r);
		return;
	}
	if (r->kind != R_WRITE) {
		logmsg("FS_END for id %u, which is not an FS_WRITE, ignored", m->id);
		return;
	}
	int fd = r->fd;
	r->fd = -1;
	if (close(fd) < 0) {
		reply_error(r->id, errno, "close: %s", strerror(errno));
	} else {
		msg_begin(r->id, M_OK);
		f_int(T_SIZE, r->size);
		msg_end();
	}
	release(r);
}

static void h_fs_list(const struct msg *m)
{
	char path[PATH_MAX];
	if (!need_path(m, T_PATH, path))
		return;
	DIR *d = opendir(path);
	if (!d) {
		reply_error(m->id, errno, "%s: %s", path, strerror(errno));
		return;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		struct stat st;
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue; /* removed meanwhile */
		msg_begin(m->id, M_DIRENT);
		f_str(T_NAME, e->d_name);
		f_int(T_KIND, kind_of(st.st_mode));
		f_int(T_SIZE, st.st_size);
		f_int(T_MODE, st.st_mode);
		f_int(T_MTIME_NS, mtime_ns(&st));
		msg_end();
	}
	closedir(d);
	reply_ok(m->id);
}

static void h_fs_stat(const struct msg *m)
{
	char path[PATH_MAX];
	struct stat st;
	if (!need_path(m, T_PATH, path))
		return;
	int r = (get_int_or(m, T_FLAGS, 0) & 1) ? lstat(path, &st) : stat(path, &st);
	if (r < 0) {
		reply_error(m->id, errno, "%s: %s", path, strerror(errno));
		return;
	}
	msg_begin(m->id, M_OK);
	f_int(T_KIND, kind_of(st.st_mode));
	f_int(T_SIZE, st.st_size);
	f_int(T_MODE, st.st_mode);
	f_int(T_MTIME_NS, mtime_ns(&st));
	f_int(T_UID, st.st_uid);
	f_int(T_GID, st.st_gid);
	msg_end();
}

static void h_fs_mkdir(const struct msg *m)
{
	char path[PATH_MAX];
	int64_t mode;
	if (!need_path(m, T_PATH, path))
		return;
	bool has_mode = get_int(m, T_MODE, &mode);
	mode_t md = has_mode ? (mode_t)(mode & 07777) : 0755;
	int created;
	if (get_int_or(m, T_FLAGS, 0) & 1)
		created = mkdir_p(path, md);
	else
		created = mkdir(path, md) < 0 ? -1 : 1;
	if (created < 0 || (created == 1 && has_mode && chmod(path, md) < 0)) {
		reply_error(m->id, errno, "%s: %s", path, strerror(errno));
		return;
	}
	reply_ok(m->id);
}

static int rm_cb(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)sb;
	(void)ftw;
	return (type == FTW_DP || type == FTW_D || type == FTW_DNR) ? rmdir(path) : unlink(path);
}

static void h_fs_remove(const struct msg *m)
{
	char path[PATH_MAX];
	struct stat st;
	if (!need_path(m, T_PATH, path))
		return;
	int r;
	if (get_int_or(m, T_FLAGS, 0) & 1)
		r = nftw(path, rm_cb, 32, FTW_DEPTH | FTW_PHYS); /* never follows symlinks */
	else if ((r = lstat(path, &st)) == 0)
		r = S_ISDIR(st.st_mode) ? rmdir(path) : unlink(path);
	if (r != 0) {
		int e = errno ? errno : EIO;
		reply_error(m->id, e, "%s: %s", path, strerror(e));
		return;
	}
	reply_ok(m->id);
}

static void h_fs_rename(const struct msg *m)
{
	char from[PATH_MAX], to[PATH_MAX];
	if (!need_path(m, T_PATH, from) || !need_path(m, T_PATH2, to))
		return;
	if (rename(from, to) < 0) {
		reply_error(m->id, errno, "rename %s to %s: %s", from, to, strerror(errno));
		return;
	}
	reply_ok(m->id);
}

static void h_fs_chmod(const struct msg *m)
{
	char path[PATH_MAX];
	int64_t mode;
	if (!need_path(m, T_PATH, path))
		return;
	if (!get_int(m, T_MODE, &mode)) {
		reply_error(m->id, EPROTO, "missing MODE");
		return;
	}
	if (chmod(path, (mode_t)(mode & 07777)) < 0) {
		reply_error(m->id, errno, "%s: %s", path, strerror(errno));
		return;
	}
	reply_ok(m->id);
}

/* FS_READLINK: the target of the symlink PATH, as DATA (the host copies guest links as links). */
static void h_fs_readlink(const struct msg *m)
{
	char path[PATH_MAX], target[PATH_MAX];
	if (!need_path(m, T_PATH, path))
		return;
	ssize_t n = readlink(path, target, sizeof target);
	if (n < 0) {
		reply_error(m->id, errno, "%s: %s", path, strerror(errno));
		return;
	}
	if ((size_t)n >= sizeof target) {
		reply_error(m->id, ENAMETOOLONG, "%s: link target too long", path);
		return;
	}
	msg_begin(m->id, M_OK);
	f_bytes(T_DATA, target, (size_t)n);
	msg_end();
}

/* FS_COPY: guest file PATH, or SIZE bytes at OFFSET of the virtio-blk disk
 * SOURCE "serial:NAME", to PATH2. The host moves bulk data in through its
 * read-only transfer disk (serial msb.xfer): it writes the bytes into the
 * disk's backing file and asks for this copy, ~100 MB/s under TCG where the
 * virtio-serial port moves ~3 MB/s host->guest (4 KiB per round trip). The
 * disk is read with O_DIRECT, so the guest's page cache never serves bytes of
 * an earlier transfer. Done in steps from the loop, like FS_READ. */
#define COPY_ALIGN 4096

static bool find_disk(const char *serial, char *dev, size_t cap);

static int open_transfer_disk(const struct msg *m, const char *source, int64_t *limit)
{
	char dev[64];
	int64_t offset = get_int_or(m, T_OFFSET, 0);
	if (!get_int(m, T_SIZE, limit) || *limit < 0 || offset < 0 || offset % COPY_ALIGN) {
		reply_error(m->id, EPROTO, "a copy from a disk needs SIZE >= 0 and OFFSET a "
			    "multiple of %d", COPY_ALIGN);
		return -1;
	}
	if (strncmp(source, "serial:", 7) || !find_disk(source + 7, dev, sizeof dev)) {
		reply_error(m->id, ENODEV, "no virtio-blk disk with serial '%s'", source + 7);
		return -1;
	}
	int fd = open(dev, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (fd < 0 || lseek(fd, (off_t)offset, SEEK_SET) < 0) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		reply_error(m->id, e, "%s: %s", dev, strerror(e));
		return -1;
	}
	return fd;
}

static void h_fs_copy(const struct msg *m)
{
	char src[PATH_MAX], dst[PATH_MAX];
	const uint8_t *p;
	uint32_t n;
	bool from_disk = get_field(m, T_SOURCE, &p, &n);
	if (from_disk) {
		if (n == 0 || n >= sizeof src || memchr(p, 0, n)) {
			reply_error(m->id, EPROTO, "bad SOURCE");
			return;
		}
		memcpy(src, p, n);
		src[n] = '\0';
	} else if (!need_path(m, T_PATH, src)) {
		return;
	}
	if (!need_path(m, T_PATH2, dst))
		return;
	int64_t flags = get_int_or(m, T_FLAGS, 0), mode, limit = -1;
	bool has_mode = get_int(m, T_MODE, &mode);
	if (!req_slot_free(m->id))
		return;
	int in = from_disk ? open_transfer_disk(m, src, &limit) : open_regular(m->id, src);
	if (in < 0)
		return;
	if ((flags & 1) && mkdir_parents(dst) < 0) {
		int e = errno;
		close(in);
		reply_error(m->id, e, "cannot create parents of %s: %s", dst, strerror(e));
		return;
	}
	mode_t perm = has_mode ? (mode_t)(mode & 07777) : 0644;
	int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK, perm);
	if (out < 0 || (has_mode && fchmod(out, perm) < 0)) {
		int e = errno;
		close(in);
		if (out >= 0)
			close(out);
		reply_error(m->id, e, "%s: %s", dst, strerror(e));
		return;
	}
	struct req *r = new_req(m->id, R_COPY);
	r->fd = in;
	r->fd2 = out;
	r->limit = limit;
}

#define COPY_BUF (1 << 20)
#define COPY_BURST 4 /* MiB per loop iteration, so other requests keep moving */

static void fs_copy_done(struct req *r)
{
	msg_begin(r->id, M_OK);
	f_int(T_SIZE, r->size);
	msg_end();
	release(r);
}

static void fs_copy_step(struct req *r)
{
	static uint8_t *buf; /* aligned for O_DIRECT reads */
	if (!buf && posix_memalign((void **)&buf, COPY_ALIGN, COPY_BUF) != 0)
		die("out of memory");
	for (int i = 0; i < COPY_BURST; i++) {
		size_t want = COPY_BUF;
		if (r->limit >= 0) {
			int64_t left = r->limit - r->size;
			if (left == 0) {
				fs_copy_done(r);
				return;
			}
			if (left < COPY_BUF) /* O_DIRECT reads whole blocks */
				want = (size_t)((left + COPY_ALIGN - 1) / COPY_ALIGN * COPY_ALIGN);
		}
		ssize_t n = read(r->fd, buf, want);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			reply_error(r->id, errno, "read: %s", strerror(errno));
			release(r);
			return;
		}
		if (n == 0 && r->limit >= 0) {
			reply_error(r->id, EIO, "the transfer disk ended %lld bytes short",
				    (long long)(r->limit - r->size));
			release(r);
			return;
		}
		if (n == 0) {
			fs_copy_done(r);
			return;
		}
		if (r->limit >= 0 && n > r->limit - r->size)
			n = (ssize_t)(r->limit - r->size);
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(r->fd2, buf + off, (size_t)(n - off));
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0) {
				reply_error(r->id, errno, "write: %s", strerror(errno));
				release(r);
				return;
			}
			off += w;
		}
		r->size += n;
	}
}

/* ----------------------------------------------------- system requests */

static void h_hello(const struct msg *m)
{
	int64_t v;
	if (!get_int(m, T_VERSION, &v)) {
		reply_error(m->id, EPROTO, "missing VERSION");
		return;
	}
	if (v != PROTO_VERSION) {
		reply_error(m->id, EPROTONOSUPPORT, "host speaks protocol %lld, agent %s speaks %d",
			    (long long)v, AGENT_VERSION, PROTO_VERSION);
		return;
	}
	msg_begin(m->id, M_OK);
	f_int(T_VERSION, PROTO_VERSION);
	f_str(T_AGENT_VERSION, AGENT_VERSION);
	f_int(T_UPTIME_MS, clock_ms(CLOCK_BOOTTIME));
	msg_end();
}

/* ------------------------------------------------------------- names */

#define HOSTS_MARK "# pytest-microsandbox: this guest's hostname"
#define HOSTS_DEFAULT "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

/* Is `name` (n bytes) one of the names on an /etc/hosts line? */
static bool hosts_line_names(const char *line, size_t len, const char *name, size_t n)
{
	size_t i = 0;
	while (i < len && (line[i] == ' ' || line[i] == '\t'))
		i++;
	if (i < len && line[i] == '#')
		return false;
	while (i < len && line[i] != ' ' && line[i] != '\t') /* the address */
		i++;
	while (i < len && line[i] != '#') {
		while (i < len && (line[i] == ' ' || line[i] == '\t'))
			i++;
		size_t start = i;
		while (i < len && line[i] != ' ' && line[i] != '\t' && line[i] != '#')
			i++;
		if (i - start == n && !strncasecmp(line + start, name, n))
			return true;
	}
	return false;
}

/*
 * Makes this guest's hostname resolve, as it does on a Debian host (127.0.1.1),
 * so gethostbyname(gethostname()) and getfqdn() answer from /etc/hosts instead
 * of asking a resolver that does not exist.  The line we add is marked and
 * replaced when a clone gets its own name; /etc/hosts is created with the
 * localhost lines if the image has none.  /etc lives on the guest's tmpfs
 * overlay, so none of this reaches the image or the host.
 */
static void hosts_map_hostname(const char *name, size_t n)
{
	static char old[65536], out[65536 + 256];
	for (size_t i = 0; i < n; i++) /* only plain host names go into the file */
		if (!((name[i] >= 'a' && name[i] <= 'z') || (name[i] >= 'A' && name[i] <= 'Z') ||
		      (name[i] >= '0' && name[i] <= '9') || name[i] == '-' || name[i] == '.' ||
		      name[i] == '_'))
			return;
	struct stat st;
	ssize_t len;
	if (lstat("/etc/hosts", &st) == 0) {
		if (!S_ISREG(st.st_mode) || st.st_size >= (off_t)sizeof old - 1)
			return; /* a symlink or a large file: the image manages it */
		if ((len = read_small("/etc/hosts", old, sizeof old)) < 0)
			return;
	} else {
		mkdir("/etc", 0755);
		len = snprintf(old, sizeof old, "%s", HOSTS_DEFAULT);
	}
	/* Our line goes after the leading comments and before every other line:
	 * getfqdn() names the first line of 127.0.1.1. */
	size_t o = 0, at = SIZE_MAX;
	bool mapped = false;
	for (const char *line = old; line < old + len;) {
		const char *end = memchr(line, '\n', (size_t)(old + len - line));
		size_t l = end ? (size_t)(end - line) : (size_t)(old + len - line);
		bool ours = l >= strlen(HOSTS_MARK) &&
			    !memcmp(line + l - strlen(HOSTS_MARK), HOSTS_MARK, strlen(HOSTS_MARK));
		if (!ours) {
			if (at == SIZE_MAX && l > 0 && line[0] != '#')
				at = o;
			mapped = mapped || hosts_line_names(line, l, name, n);
			memcpy(out + o, line, l);
			o += l;
			out[o++] = '\n';
		}
		line += l + 1;
	}
	if (!mapped) {
		char entry[160];
		size_t e = (size_t)snprintf(entry, sizeof entry, "127.0.1.1\t%.*s\t%s\n", (int)n, name,
					    HOSTS_MARK);
		if (at == SIZE_MAX)
			at = o;
		memmove(out + at + e, out + at, o - at);
		memcpy(out + at, entry, e);
		o += e;
	}
	int fd = open("/etc/.hosts.msb", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		logmsg("warning: /etc/hosts: %s", strerror(errno));
		return;
	}
	write_all_fd(fd, out, o);
	fchmod(fd, 0644);
	close(fd);
	if (rename("/etc/.hosts.msb", "/etc/hosts") < 0) {
		logmsg("warning: /etc/hosts: %s", strerror(errno));
		unlink("/etc/.hosts.msb");
	}
}

/*
 * Brings the loopback interface up: every Linux system a test expects has
 * it, whatever the network policy (network="none" means no path out of the
 * VM, not no loopback inside it).  The kernel gives lo 127.0.0.1/8 and ::1
 * (IPv6 is built into the guest kernel) when it comes up.  Templates are
 * snapshots taken after this, so clones, forks and zygotes inherit it.
 */
static void loopback_up(void)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) {
		logmsg("warning: loopback: %s", strerror(errno));
	} else {
		ifr.ifr_flags |= IFF_UP;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
			logmsg("warning: bringing lo up: %s", strerror(errno));
	}
	if (fd >= 0)
		close(fd);
}

static void h_configure(const struct msg *m)
{
	const uint8_t *p;
	uint32_t n;
	int64_t t;
	if (get_field(m, T_SEED, &p, &n) && n > 512) {
		reply_error(m->id, EINVAL, "SEED longer than 512 bytes");
		return;
	}
	if (get_field(m, T_HOSTNAME, &p, &n) && (n == 0 || n > 64 || memchr(p, 0, n))) {
		reply_error(m->id, EINVAL, "invalid HOSTNAME");
		return;
	}
	if (!pid1) { /* host mode: never touch the host's clock, RNG or name */
		reply_ok(m->id);
		return;
	}
	if (get_int(m, T_TIME_NS, &t)) {
		struct timespec ts = {.tv_sec = t / 1000000000, .tv_nsec = t % 1000000000};
		if (t < 0 || clock_settime(CLOCK_REALTIME, &ts) < 0) {
			reply_error(m->id, t < 0 ? EINVAL : errno, "cannot set the clock");
			return;
		}
	}
	if (get_field(m, T_SEED, &p, &n) && n > 0) {
		struct {
			int entropy_count, buf_size;
			uint8_t buf[512];
		} pool = {.entropy_count = (int)n * 8, .buf_size = (int)n};
		memcpy(pool.buf, p, n);
		int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
		int r = fd < 0 ? -1 : ioctl(fd, MSB_RNDADDENTROPY, &pool);
		if (r == 0)
			r = ioctl(fd, MSB_RNDRESEEDCRNG);
		int e = errno;
		if (fd >= 0)
			close(fd);
		if (r < 0) {
			reply_error(m->id, e, "reseeding the RNG: %s", strerror(e));
			return;
		}
	}
	if (get_field(m, T_HOSTNAME, &p, &n)) {
		if (sethostname((const char *)p, n) < 0) {
			reply_error(m->id, errno, "sethostname: %s", strerror(errno));
			return;
		}
		hosts_map_hostname((const char *)p, n);
	}
	reply_ok(m->id);
}

/* ------------------------------------------------------------- network */

/*
 * NET gives this guest its network (docs/network.md): eth0, the virtio NIC
 * whose frames QEMU hands to the host's shim, gets a MAC and a /30; wg0, a
 * WireGuard interface whose one peer is the host's user-mode TCP/IP stack
 * behind that shim, carries the default route.  Sent after every restore
 * with a fresh key, MAC and addresses, so live clones share no identity.
 * Nothing here is a security boundary: the host enforces the policy on every
 * flow, whatever a guest root does to these interfaces.  The netlink
 * structures are spelled out because musl-gcc has no linux/ headers.
 */
#define NET_LEN 102 /* mac 6, eth addr 4, prefix 1, gw 4, gw port 2, wg addr 4, keys 32+32, flags 1,
			wg IPv6 addr 16 (all zero: no IPv6) */
#define NET_F_NO_ROUTE 1 /* nothing is allowed: no default route, connects fail at once */
/* A rehearsal (a pooled clone, throwaway identity): every step, then the
 * routes, the peer (its session) and the addresses, IPv4 and IPv6, removed,
 * wg0 left up: a sandbox's own NET later runs the same paths, translated.
 * (Down and up again would not: wg0's open and stop paths are slow under
 * TCG, RCU grace periods.)  Never with NET_F_NO_ROUTE: the undo removes the
 * routes it added. */
#define NET_F_REHEARSAL 2
/* wg0's persistent keepalive: setting it sends one at once, which starts the
 * WireGuard handshake while NET returns instead of at the first connect. */
#define NET_KEEPALIVE_S 25
#define NL_ROUTE 0
#define NL_GENERIC 16
#define NLF_REQUEST 0x1
#define NLF_ACK 0x4
#define NLF_EXCL 0x200
#define NLF_CREATE 0x400
#define NLMSG_ERR 2
#define RTM_NEWLINK_ 16
#define RTM_DELROUTE_ 25
#define RT_TABLE_LOCAL_ 255
#define RTA_DST_ 1
#define RTA_OIF_ 4
#define IFLA_IFNAME_ 3
#define IFLA_LINKINFO_ 18
#define IFLA_INFO_KIND_ 1
#define GENL_ID_CTRL_ 0x10
#define CTRL_CMD_GETFAMILY_ 3
#define CTRL_ATTR_FAMILY_ID_ 1
#define CTRL_ATTR_FAMILY_NAME_ 2
#define NLA_NESTED 0x8000
#define WG_SET_DEVICE 1
#define WGD_IFNAME 2
#define WGD_PRIVATE_KEY 3
#define WGD_FLAGS 5
#define WGD_PEERS 8
#define WGD_F_REPLACE_PEERS 1
#define WGP_PUBLIC_KEY 1
#define WGP_FLAGS 3
#define WGP_ENDPOINT 4
#define WGP_PERSISTENT_KEEPALIVE 5
#define WGP_ALLOWEDIPS 9
#define WGP_F_REPLACE_ALLOWEDIPS 2
#define WGA_FAMILY 1
#define WGA_IPADDR 2
#define WGA_CIDR_MASK 3

struct nl_hdr { uint32_t len; uint16_t type, flags; uint32_t seq, pid; };
struct nl_attr { uint16_t len, type; };
struct nl_buf { uint8_t b[1024]; uint32_t len; uint32_t nest[4]; int depth; };

static void nl_start(struct nl_buf *nb, uint16_t type, uint16_t flags)
{
	memset(nb, 0, sizeof *nb);
	struct nl_hdr *h = (struct nl_hdr *)nb->b;
	h->type = type;
	h->flags = flags | NLF_REQUEST | NLF_ACK;
	h->seq = 1;
	nb->len = sizeof *h;
}

static void nl_put(struct nl_buf *nb, const void *p, uint32_t n)
{
	memcpy(nb->b + nb->len, p, n);
	nb->len += (n + 3) & ~3u;
}

static void nl_attr(struct nl_buf *nb, uint16_t type, const void *p, uint16_t n)
{
	struct nl_attr a = {.len = (uint16_t)(sizeof a + n), .type = type};
	memcpy(nb->b + nb->len, &a, sizeof a);
	memcpy(nb->b + nb->len + sizeof a, p, n);
	nb->len += (sizeof a + n + 3) & ~3u;
}

static void nl_nest(struct nl_buf *nb, uint16_t type)
{
	nb->nest[nb->depth++] = nb->len;
	nl_attr(nb, type | NLA_NESTED, NULL, 0);
}

static void nl_end(struct nl_buf *nb)
{
	struct nl_attr *a = (struct nl_attr *)(nb->b + nb->nest[--nb->depth]);
	a->len = (uint16_t)(nb->len - nb->nest[nb->depth]);
}

/* Sends one request and reads its answer; returns 0, -errno, or (with
 * `reply`) copies the first non-error message into it. */
static int nl_call(int proto, struct nl_buf *nb, uint8_t *reply, size_t cap)
{
	((struct nl_hdr *)nb->b)->len = nb->len;
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, proto);
	if (fd < 0)
		return -errno;
	int rc = -EPROTO;
	if (send(fd, nb->b, nb->len, 0) != (ssize_t)nb->len) {
		rc = -errno;
		goto out;
	}
	uint8_t in[4096];
	for (;;) {
		ssize_t n = recv(fd, in, sizeof in, 0);
		if (n < (ssize_t)sizeof(struct nl_hdr)) {
			rc = n < 0 ? -errno : -EPROTO;
			goto out;
		}
		struct nl_hdr *h = (struct nl_hdr *)in;
		if (h->len > (uint32_t)n || h->len < sizeof *h)
			goto out;
		if (h->type == NLMSG_ERR) {
			if (h->len < sizeof *h + 4)
				goto out;
			int32_t e;
			memcpy(&e, in + sizeof *h, 4);
			rc = e;
			goto out;
		}
		if (reply && h->len <= cap) {
			memcpy(reply, in, h->len);
			reply = NULL;
		}
	}
out:
	close(fd);
	return rc;
}

/* The id of generic-netlink family "wireguard", or -errno. */
static int wg_family(void)
{
	struct nl_buf nb;
	uint8_t genl[4] = {CTRL_CMD_GETFAMILY_, 1, 0, 0};
	nl_start(&nb, GENL_ID_CTRL_, 0);
	nl_put(&nb, genl, sizeof genl);
	nl_attr(&nb, CTRL_ATTR_FAMILY_NAME_, "wireguard", 10);
	uint8_t reply[4096] = {0};
	int rc = nl_call(NL_GENERIC, &nb, reply, sizeof reply);
	if (rc < 0)
		return rc;
	struct nl_hdr *h = (struct nl_hdr *)reply;
	for (uint32_t off = sizeof *h + 4; off + sizeof(struct nl_attr) <= h->len && h->len <= sizeof reply;) {
		struct nl_attr *a = (struct nl_attr *)(reply + off);
		if (a->len < sizeof *a || off + a->len > h->len)
			break;
		if ((a->type & ~NLA_NESTED) == CTRL_ATTR_FAMILY_ID_ && a->len >= sizeof *a + 2) {
			uint16_t id;
			memcpy(&id, reply + off + sizeof *a, 2);
			return id;
		}
		off += (a->len + 3u) & ~3u;
	}
	return -ENOENT;
}

static int ifreq_call(int fd, unsigned long req, struct ifreq *ifr, const char *name)
{
	snprintf(ifr->ifr_name, sizeof ifr->ifr_name, "%s", name);
	return ioctl(fd, req, ifr) < 0 ? -errno : 0;
}

static int set_addr(int fd, const char *dev, const uint8_t addr[4], int prefix)
{
	struct ifreq ifr;
	struct sockaddr_in sin = {.sin_family = AF_INET};
	memset(&ifr, 0, sizeof ifr);
	memcpy(&sin.sin_addr, addr, 4);
	memcpy(&ifr.ifr_addr, &sin, sizeof sin);
	int rc = ifreq_call(fd, SIOCSIFADDR, &ifr, dev);
	if (rc < 0)
		return rc;
	uint32_t mask = prefix ? htonl(~0u << (32 - prefix)) : 0;
	memcpy(&sin.sin_addr, &mask, 4);
	memset(&ifr, 0, sizeof ifr);
	memcpy(&ifr.ifr_netmask, &sin, sizeof sin);
	return ifreq_call(fd, SIOCSIFNETMASK, &ifr, dev);
}

static int clear_addr(int fd, const char *dev)
{
	struct ifreq ifr;
	struct sockaddr_in sin = {.sin_family = AF_INET};
	memset(&ifr, 0, sizeof ifr);
	memcpy(&ifr.ifr_addr, &sin, sizeof sin);
	return ifreq_call(fd, SIOCSIFADDR, &ifr, dev);
}

static int set_flags(int fd, const char *dev, short on, short off)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	int rc = ifreq_call(fd, SIOCGIFFLAGS, &ifr, dev);
	if (rc < 0)
		return rc;
	ifr.ifr_flags = (short)((ifr.ifr_flags | on) & ~off);
	return ifreq_call(fd, SIOCSIFFLAGS, &ifr, dev);
}

/* The kernel's struct in6_ifreq and in6_rtmsg (linux/ipv6.h, ipv6_route.h). */
struct msb_in6_ifreq { struct in6_addr addr; uint32_t prefixlen; int ifindex; };
struct msb_in6_rtmsg {
	struct in6_addr dst, src, gateway;
	uint32_t type;
	uint16_t dst_len, src_len;
	uint32_t metric;
	unsigned long info;
	uint32_t flags;
	int ifindex;
};

/*
 * wg0's IPv6: drop the addresses it has (a fork's parent's), add `addr`/128
 * (no DAD: wg0 is NOARP), and a default route unless `route` is false.
 */
static int wg_ipv6(const uint8_t addr[16], bool route, const char **step)
{
	int ifindex = (int)if_nametoindex("wg0");
	int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || !ifindex)
		return fd < 0 ? -errno : -ENODEV;
	int rc = 0;
	*step = "wg0 IPv6 address";
	FILE *f = fopen("/proc/net/if_inet6", "re");
	char hex[33], dev[32];
	unsigned idx, plen, scope, flags;
	while (f && fscanf(f, "%32s %x %x %x %x %31s", hex, &idx, &plen, &scope, &flags, dev) == 6) {
		if (strcmp(dev, "wg0"))
			continue;
		struct msb_in6_ifreq old = {.prefixlen = plen, .ifindex = ifindex};
		for (int i = 0; i < 16; i++) {
			unsigned byte;
			sscanf(hex + 2 * i, "%2x", &byte);
			old.addr.s6_addr[i] = (uint8_t)byte;
		}
		(void)ioctl(fd, SIOCDIFADDR, &old);
	}
	if (f)
		fclose(f);
	struct msb_in6_ifreq ifr = {.prefixlen = 128, .ifindex = ifindex};
	memcpy(ifr.addr.s6_addr, addr, 16);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0 && errno != EEXIST) {
		rc = -errno;
		goto out;
	}
	*step = "IPv6 default route";
	if (route) {
		struct msb_in6_rtmsg rt = {.flags = RTF_UP, .metric = 1, .ifindex = ifindex};
		if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST)
			rc = -errno;
	}
out:
	close(fd);
	return rc;
}

/* The multicast route (ff00::/8) the kernel gives an interface with IPv6
 * when it comes up or gets an address.  It is in the local table, which the
 * route ioctls do not reach: rtnetlink. */
static int wg_drop_mroute(int ifindex)
{
	struct nl_buf nb;
	/* struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags */
	uint8_t rtm[12] = {AF_INET6, 8, 0, 0, RT_TABLE_LOCAL_, 0, 0, 0};
	uint8_t dst[16] = {0xff};
	nl_start(&nb, RTM_DELROUTE_, 0);
	nl_put(&nb, rtm, sizeof rtm);
	nl_attr(&nb, RTA_DST_, dst, sizeof dst);
	nl_attr(&nb, RTA_OIF_, &ifindex, sizeof ifindex);
	int rc = nl_call(NL_ROUTE, &nb, NULL, 0);
	return rc == -ESRCH ? 0 : rc;
}

/*
 * Undoes wg_ipv6 after a rehearsal: its default route (if `route`), its
 * address (with it the kernel's /128 and local routes) and the multicast
 * route, so wg0 is left with no IPv6 address or route, as at boot
 * (net_prepare).  The rehearsal's point is that the sandbox's own NET then
 * finds these kernel paths translated: under TCG the IPv6 address alone
 * took 9-44 ms in a fresh clone.
 */
static int wg_ipv6_undo(const uint8_t addr[16], bool route, const char **step)
{
	int ifindex = (int)if_nametoindex("wg0");
	int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || !ifindex)
		return fd < 0 ? -errno : -ENODEV;
	int rc = 0;
	*step = "removing the rehearsal's IPv6 route";
	struct msb_in6_rtmsg rt = {.flags = RTF_UP, .metric = 1, .ifindex = ifindex};
	if (route && ioctl(fd, SIOCDELRT, &rt) < 0) {
		rc = -errno;
		goto out;
	}
	*step = "removing the rehearsal's IPv6 address";
	struct msb_in6_ifreq ifr = {.prefixlen = 128, .ifindex = ifindex};
	memcpy(ifr.addr.s6_addr, addr, 16);
	if (ioctl(fd, SIOCDIFADDR, &ifr) < 0) {
		rc = -errno;
		goto out;
	}
	*step = "removing the rehearsal's IPv6 multicast route";
	rc = wg_drop_mroute(ifindex);
out:
	close(fd);
	return rc;
}

static int wg_create(void)
{
	struct nl_buf nb;
	uint8_t ifi[16] = {0}; /* struct ifinfomsg, family AF_UNSPEC */
	nl_start(&nb, RTM_NEWLINK_, NLF_CREATE | NLF_EXCL);
	nl_put(&nb, ifi, sizeof ifi);
	nl_attr(&nb, IFLA_IFNAME_, "wg0", 4);
	nl_nest(&nb, IFLA_LINKINFO_);
	nl_attr(&nb, IFLA_INFO_KIND_, "wireguard", 10);
	nl_end(&nb);
	int rc = nl_call(NL_ROUTE, &nb, NULL, 0);
	return rc == -EEXIST ? 0 : rc;
}

/*
 * At boot, so it is in every template: eth0 up without ARP or IPv6 (the shim
 * answers neither; frames reach the host whatever their destination MAC) and
 * wg0 created, down, with no key.  A clone's first run of a kernel path is
 * slow under TCG (its translation cache starts empty): bringing a NIC up and
 * creating a WireGuard device cost ~350 ms there, so clones only set keys and
 * addresses.  Without NET nothing has an address or a route: no path out.
 */
static void net_prepare(void)
{
	int fd = open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		write_all_fd(fd, "1", 1);
		close(fd);
	}
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	int rc = s < 0 ? -errno : set_flags(s, "eth0", IFF_UP | IFF_NOARP, 0);
	if (s >= 0)
		close(s);
	if (rc < 0)
		logmsg("warning: eth0: %s", strerror(-rc));
	if ((rc = wg_create()) < 0)
		logmsg("warning: wg0: %s", strerror(-rc));
	/* Up with no key, peer, address or route: it carries nothing until NET. */
	s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s >= 0 && (rc = set_flags(s, "wg0", IFF_UP, 0)) < 0)
		logmsg("warning: wg0 up: %s", strerror(-rc));
	if (s >= 0)
		close(s);
	/* Coming up gave wg0 a multicast route (ff00::/8): no IPv6 route at all
	 * until NET, whose address brings it back. */
	int ifindex = (int)if_nametoindex("wg0");
	if (ifindex && (rc = wg_drop_mroute(ifindex)) < 0)
		logmsg("warning: wg0 multicast route: %s", strerror(-rc));
}

static int net_setup(const uint8_t *c, const char **step)
{
	const uint8_t *mac = c, *eth = c + 6, *gw = c + 11, *gw_port = c + 15, *wg = c + 17;
	const uint8_t *key = c + 21, *peer = c + 53;
	int prefix = c[10];
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	struct ifreq ifr;
	int rc;
	/* eth0: a fresh MAC (virtio-net changes it live), an address to send
	 * WireGuard from; up and without ARP since boot (net_prepare). */
	*step = "eth0 MAC";
	memset(&ifr, 0, sizeof ifr);
	ifr.ifr_hwaddr.sa_family = 1; /* ARPHRD_ETHER */
	memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
	if ((rc = ifreq_call(fd, SIOCSIFHWADDR, &ifr, "eth0")) < 0)
		goto out;
	*step = "eth0 up";
	if ((rc = set_flags(fd, "eth0", IFF_UP | IFF_NOARP, 0)) < 0)
		goto out;
	*step = "eth0 address";
	if ((rc = set_addr(fd, "eth0", eth, prefix)) < 0)
		goto out;
	*step = "creating wg0";
	if ((rc = wg_create()) < 0)
		goto out;
	*step = "wireguard family";
	int fam = wg_family();
	if ((rc = fam) < 0)
		goto out;
	/* Up before the key and peer are set: the keepalive below then goes out
	 * at once (a rehearsal left wg0 down). */
	*step = "wg0 up";
	if ((rc = set_flags(fd, "wg0", IFF_UP, 0)) < 0)
		goto out;
	*step = "configuring wg0";
	struct nl_buf nb;
	uint8_t genl[4] = {WG_SET_DEVICE, 1, 0, 0};
	uint32_t dflags = WGD_F_REPLACE_PEERS, pflags = WGP_F_REPLACE_ALLOWEDIPS;
	struct sockaddr_in ep = {.sin_family = AF_INET};
	memcpy(&ep.sin_addr, gw, 4);
	memcpy(&ep.sin_port, gw_port, 2); /* both network order */
	uint16_t family = AF_INET, family6 = AF_INET6;
	uint8_t any[16] = {0}, mask = 0;
	uint16_t keepalive = NET_KEEPALIVE_S;
	nl_start(&nb, (uint16_t)fam, 0);
	nl_put(&nb, genl, sizeof genl);
	nl_attr(&nb, WGD_IFNAME, "wg0", 4);
	nl_attr(&nb, WGD_PRIVATE_KEY, key, 32);
	nl_attr(&nb, WGD_FLAGS, &dflags, 4);
	nl_nest(&nb, WGD_PEERS);
	nl_nest(&nb, 0);
	nl_attr(&nb, WGP_PUBLIC_KEY, peer, 32);
	nl_attr(&nb, WGP_FLAGS, &pflags, 4);
	nl_attr(&nb, WGP_ENDPOINT, &ep, sizeof ep);
	nl_attr(&nb, WGP_PERSISTENT_KEEPALIVE, &keepalive, 2);
	nl_nest(&nb, WGP_ALLOWEDIPS);
	nl_nest(&nb, 0);
	nl_attr(&nb, WGA_FAMILY, &family, 2);
	nl_attr(&nb, WGA_IPADDR, any, 4);
	nl_attr(&nb, WGA_CIDR_MASK, &mask, 1);
	nl_end(&nb);
	nl_nest(&nb, 0); /* ::/0: the host decides IPv6 flows like the rest */
	nl_attr(&nb, WGA_FAMILY, &family6, 2);
	nl_attr(&nb, WGA_IPADDR, any, 16);
	nl_attr(&nb, WGA_CIDR_MASK, &mask, 1);
	nl_end(&nb);
	nl_end(&nb);
	nl_end(&nb);
	nl_end(&nb);
	if ((rc = nl_call(NL_GENERIC, &nb, NULL, 0)) < 0)
		goto out;
	*step = "wg0 address";
	if ((rc = set_addr(fd, "wg0", wg, 32)) < 0)
		goto out;
	static const uint8_t no_v6[16];
	if (memcmp(c + 86, no_v6, 16) && (rc = wg_ipv6(c + 86, !(c[85] & NET_F_NO_ROUTE), step)) < 0)
		goto out;
	*step = "default route";
	if (c[85] & NET_F_NO_ROUTE)
		goto out;
	struct rtentry rt;
	memset(&rt, 0, sizeof rt);
	struct sockaddr_in zero = {.sin_family = AF_INET};
	memcpy(&rt.rt_dst, &zero, sizeof zero);
	memcpy(&rt.rt_genmask, &zero, sizeof zero);
	rt.rt_flags = RTF_UP;
	rt.rt_dev = (char *)"wg0";
	if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST)
		rc = -errno;
	if (rc == 0 && (c[85] & NET_F_REHEARSAL)) {
		*step = "removing the rehearsal's route";
		if (ioctl(fd, SIOCDELRT, &rt) < 0) {
			rc = -errno;
			goto out;
		}
		/* And its key: an all-zero private key leaves wg0 with none, as at
		 * boot, so the sandbox's own NET sets a key on a keyless wg0, the
		 * very path rehearsed, and a network-off clone keeps no identity. */
		*step = "removing the rehearsal's peer and key";
		static const uint8_t no_key[32];
		nl_start(&nb, (uint16_t)fam, 0);
		nl_put(&nb, genl, sizeof genl);
		nl_attr(&nb, WGD_IFNAME, "wg0", 4);
		nl_attr(&nb, WGD_PRIVATE_KEY, no_key, 32);
		nl_attr(&nb, WGD_FLAGS, &dflags, 4);
		if ((rc = nl_call(NL_GENERIC, &nb, NULL, 0)) < 0)
			goto out;
		/* Address 0.0.0.0 deletes it (and eth0's /30 route). */
		*step = "removing the rehearsal's addresses";
		if ((rc = clear_addr(fd, "wg0")) < 0 || (rc = clear_addr(fd, "eth0")) < 0)
			goto out;
		if (memcmp(c + 86, no_v6, 16) && (rc = wg_ipv6_undo(c + 86, true, step)) < 0)
			goto out;
	}
out:
	close(fd);
	return rc;
}

/* Writes /etc/resolv.conf by a rename (images often make it a symlink); 0 or errno. */
static int write_resolv(const uint8_t *p, uint32_t n)
{
	int fd = open("/etc/.resolv.conf.msb", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return errno;
	write_all_fd(fd, (const char *)p, n);
	fchmod(fd, 0644);
	close(fd);
	unlink("/etc/resolv.conf");
	if (rename("/etc/.resolv.conf.msb", "/etc/resolv.conf") < 0) {
		int e = errno;
		unlink("/etc/.resolv.conf.msb");
		return e;
	}
	return 0;
}

static void h_net(const struct msg *m)
{
	const uint8_t *p;
	uint32_t n;
	if (!get_field(m, T_NET, &p, &n) || n != NET_LEN) {
		reply_error(m->id, EINVAL, "NET must be %d bytes", NET_LEN);
		return;
	}
	if (!pid1) {
		reply_error(m->id, ENOTSUP, "the agent runs as a host process: no guest network");
		return;
	}
	bool rehearsal = p[85] & NET_F_REHEARSAL;
	if (rehearsal && (p[85] & NET_F_NO_ROUTE)) {
		reply_error(m->id, EINVAL, "a NET rehearsal adds the default routes (no NO_ROUTE flag)");
		return;
	}
	const char *step = "";
	int rc = net_setup(p, &step);
	if (rc < 0) {
		reply_error(m->id, -rc, "network set-up, %s: %s", step, strerror(-rc));
		return;
	}
	/* DATA: the resolver configuration, written here to save a round trip. A
	 * rehearsal writes it too (the path is slow cold) with the image's own
	 * kept aside, and puts that back; if it cannot be kept, no rehearsal. */
	if (get_field(m, T_DATA, &p, &n) && n > 0 && n <= 4096) {
		int aside = 0; /* 1: linked aside, -1: the image has none */
		if (rehearsal) {
			/* A link, not a rename: the write below then unlinks an existing
			 * file, as a sandbox's NET will. */
			unlink("/etc/.resolv.conf.msb-image");
			if (link("/etc/resolv.conf", "/etc/.resolv.conf.msb-image") == 0)
				aside = 1;
			else if (errno == ENOENT)
				aside = -1;
			else {
				reply_ok(m->id);
				return;
			}
		}
		int e = write_resolv(p, n);
		if (aside == 1)
			rename("/etc/.resolv.conf.msb-image", "/etc/resolv.conf");
		else if (aside == -1)
			unlink("/etc/resolv.conf");
		if (e) {
			reply_error(m->id, e, "/etc/resolv.conf: %s", strerror(e));
			return;
		}
	}
	reply_ok(m->id);
}

static void h_metrics(const struct msg *m)
{
	char buf[4096];
	int64_t mem_total = 0, mem_avail = 0, busy = 0, idle = 0, load = 0, nprocs = 0;
	if (read_small("/proc/meminfo", buf, sizeof buf) > 0) {
		char *p;
		if ((p = strstr(buf, "MemTotal:")))
			mem_total = strtoll(p + 9, NULL, 10) * 1024;
		if ((p = strstr(buf, "MemAvailable:")))
			mem_avail = strtoll(p + 13, NULL, 10) * 1024;
	}
	if (read_small("/proc/stat", buf, sizeof buf) > 0 && strncmp(buf, "cpu ", 4) == 0) {
		/* user nice system idle iowait irq softirq steal, in clock ticks */
		long long v[8] = {0};
		char *p = buf + 4;
		for (int i = 0; i < 8; i++)
			v[i] = strtoll(p, &p, 10);
		long hz = sysconf(_SC_CLK_TCK);
		if (hz <= 0)
			hz = 100;
		busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) * 1000 / hz;
		idle = (v[3] + v[4]) * 1000 / hz;
	}
	if (read_small("/proc/loadavg", buf, sizeof buf) > 0)
		load = (int64_t)(strtod(buf, NULL) * 1000);
	DIR *d = opendir("/proc");
	if (d) {
		struct dirent *e;
		while ((e = readdir(d)))
			nprocs += e->d_name[0] >= '1' && e->d_name[0] <= '9';
		closedir(d);
	}
	msg_begin(m->id, M_OK);
	f_int(T_UPTIME_MS, clock_ms(CLOCK_BOOTTIME));
	f_int(T_MEM_TOTAL, mem_total);
	f_int(T_MEM_AVAILABLE, mem_avail);
	f_int(T_CPU_BUSY_MS, busy);
	f_int(T_CPU_IDLE_MS, idle);
	f_int(T_NPROCS, nprocs);
	f_int(T_LOAD1_MILLI, load);
	msg_end();
}

/* Attaches FILE to a free loop device (auto-cleared on its last unmount) and
 * writes its path to DEV; returns the device's fd (to close after the mount)
 * or -1 with errno set. */
static int loop_attach(const char *file, bool readonly, char *dev, size_t cap)
{
	int ffd = open(file, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (ffd < 0)
		return -1;
	int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (ctl < 0) {
		int e = errno;
		close(ffd);
		errno = e;
		return -1;
	}
	int lfd = -1;
	for (int attempt = 0; attempt < 50 && lfd < 0; attempt++) {
		int n = ioctl(ctl, MSB_LOOP_CTL_GET_FREE);
		if (n < 0)
			break;
		snprintf(dev, cap, "/dev/loop%d", n);
		lfd = open(dev, O_RDWR | O_CLOEXEC);
		if (lfd < 0) { /* devtmpfs may lag a new device */
			usleep(2000);
			continue;
		}
		struct msb_loop_config cfg;
		memset(&cfg, 0, sizeof cfg);
		cfg.fd = (uint32_t)ffd;
		cfg.info.lo_flags = MSB_LO_FLAGS_AUTOCLEAR | (readonly ? MSB_LO_FLAGS_READ_ONLY : 0);
		if (ioctl(lfd, MSB_LOOP_CONFIGURE, &cfg) < 0) {
			int e = errno;
			close(lfd);
			lfd = -1;
			if (e != EBUSY) { /* EBUSY: another attach won the race; take the next */
				errno = e;
				break;
			}
		}
	}
	int e = errno;
	close(ctl);
	close(ffd);
	errno = e;
	return lfd;
}

static void h_mount(const struct msg *m)
{
	char target[PATH_MAX], dev[300];
	const uint8_t *p;
	uint32_t n;
	char *source = NULL, *fstype = NULL, *options = NULL;
	if (!need_path(m, T_PATH, target))
		return;
	if (!get_field(m, T_SOURCE, &p, &n) || !(source = dup_cstr(p, n)) ||
	    !get_field(m, T_FSTYPE, &p, &n) || !(fstype = dup_cstr(p, n)) ||
	    (get_field(m, T_OPTIONS, &p, &n) && !(options = dup_cstr(p, n)))) {
		reply_error(m->id, EPROTO, "MOUNT needs SOURCE and FSTYPE (and no NUL bytes)");
	} else if (!strncmp(source, "serial:", 7) && !find_disk(source + 7, dev, sizeof dev)) {
		/* "serial:NAME" is the virtio-blk disk with that serial (the host
		 * cannot know the /dev name a disk probed as). */
		reply_error(m->id, ENODEV, "no virtio-blk disk with serial '%s'", source + 7);
	} else if (mkdir_p(target, 0755) < 0) {
		reply_error(m->id, errno, "mkdir %s: %s", target, strerror(errno));
	} else if (!strncmp(source, "loop:", 5)) {
		/* "loop:FILE": the file system image FILE (a guest path) on a loop device. */
		bool ro = get_int_or(m, T_FLAGS, 0) & 1;
		int lfd = loop_attach(source + 5, ro, dev, sizeof dev);
		if (lfd < 0)
			reply_error(m->id, errno, "loop device for %s: %s", source + 5, strerror(errno));
		else if (mount(dev, target, fstype, ro ? MS_RDONLY : 0, options) < 0)
			reply_error(m->id, errno, "mount %s (%s) on %s (%s): %s", source + 5, dev, target,
				    fstype, strerror(errno));
		else
			reply_ok(m->id);
		if (lfd >= 0)
			close(lfd);
	} else if (mount(strncmp(source, "serial:", 7) ? source : dev, target, fstype,
			 (get_int_or(m, T_FLAGS, 0) & 1) ? MS_RDONLY : 0, options) < 0) {
		reply_error(m->id, errno, "mount %s on %s (%s): %s", source, target, fstype, strerror(errno));
	} else {
		reply_ok(m->id);
	}
	free(source);
	free(fstype);
	free(options);
}

static void h_umount(const struct msg *m)
{
	char target[PATH_MAX];
	if (!need_path(m, T_PATH, target))
		return;
	if (umount2(target, (get_int_or(m, T_FLAGS, 0) & 1) ? MNT_DETACH : 0) < 0) {
		reply_error(m->id, errno, "umount %s: %s", target, strerror(errno));
		return;
	}
	reply_ok(m->id);
}

static void h_shutdown(const struct msg *m)
{
	reply_ok(m->id);
	/* Give the OK a chance to reach the host before the VM disappears. */
	int64_t until = clock_ms(CLOCK_MONOTONIC) + 2000;
	for (;;) {
		ob_flush();
		if (!ob_pending() || clock_ms(CLOCK_MONOTONIC) > until)
			break;
		struct pollfd pfd = {.fd = port_fd, .events = POLLOUT};
		poll(&pfd, 1, 50);
	}
	if (!pid1) {
		kill_all_execs();
		exit(0);
	}
	poweroff();
}

/* ---------------------------------------------------------- dispatch */

static bool no_reply_type(uint8_t t)
{
	return t == M_STDIN || t == M_SIGNAL || t == M_RESIZE || t == M_ACK || t == M_FS_CHUNK ||
	       t == M_FS_END;
}

static void protocol_error(const struct msg *m, const char *why)
{
	logmsg("protocol error in frame id=%u type=0x%02x: %s", m->id, m->type, why);
	if (m->id == 0)
		return;
	struct req *r = find_req(m->id);
	if (r && r->kind == R_WRITE && (m->type == M_FS_CHUNK || m->type == M_FS_END)) {
		fail_write(r, EPROTO, why);
		return;
	}
	/* Answering a message that expects no reply, or an id whose request is
	 * still running, would end that request early in the host's eyes. */
	if (!r && !no_reply_type(m->type))
		reply_error(m->id, EPROTO, "protocol error: %s", why);
}

static void handle_frame(const uint8_t *f, uint32_t len)
{
	struct msg m = {.id = be32(f), .type = f[4], .pl = f + 5, .pl_len = len - 5};
	const char *why = validate(&m);
	bool known = (m.type >= M_HELLO && m.type <= M_NET) || m.type == M_EXEC || m.type == M_STDIN ||
		     m.type == M_SIGNAL || m.type == M_RESIZE || m.type == M_ACK ||
		     (m.type >= M_FS_READ && m.type <= M_FS_READLINK);
	if (!why && !known)
		why = "unknown message type";
	if (!why && m.id == 0)
		why = "request with id 0";
	if (why) {
		protocol_error(&m, why);
		return;
	}
	if (m.type == M_HELLO)
		disown_requests(); /* before the lookup: HELLO may reuse an old live id */
	struct req *r = find_req(m.id);
	/* A failed FS_WRITE waits for its FS_END; anything else on that id means the host moved on. */
	if (r && r->kind == R_WRITE_FAILED && m.type != M_FS_CHUNK && m.type != M_FS_END) {
		release(r);
		r = NULL;
	}
	switch (m.type) {
	case M_STDIN: h_stdin(&m, r); return;
	case M_SIGNAL: h_signal(&m, r); return;
	case M_RESIZE: h_resize(&m, r); return;
	case M_ACK: h_ack(&m, r); return;
	case M_FS_CHUNK: h_fs_chunk(&m, r); return;
	case M_FS_END: h_fs_end(&m, r); return;
	default: break;
	}
	if (r) {
		logmsg("request type 0x%02x reuses live id %u; ignored", m.type, m.id);
		return;
	}
	switch (m.type) {
	case M_HELLO: h_hello(&m); break;
	case M_PING: reply_ok(m.id); break;
	case M_SHUTDOWN: h_shutdown(&m); break;
	case M_CONFIGURE: h_configure(&m); break;
	case M_METRICS: h_metrics(&m); break;
	case M_MOUNT: h_mount(&m); break;
	case M_UMOUNT: h_umount(&m); break;
	case M_NET: h_net(&m); break;
	case M_EXEC: h_exec(&m); break;
	case M_FS_READ: h_fs_read(&m); break;
	case M_FS_WRITE: h_fs_write(&m); break;
	case M_FS_LIST: h_fs_list(&m); break;
	case M_FS_STAT: h_fs_stat(&m); break;
	case M_FS_MKDIR: h_fs_mkdir(&m); break;
	case M_FS_REMOVE: h_fs_remove(&m); break;
	case M_FS_RENAME: h_fs_rename(&m); break;
	case M_FS_CHMOD: h_fs_chmod(&m); break;
	case M_FS_COPY: h_fs_copy(&m); break;
	case M_FS_READLINK: h_fs_readlink(&m); break;
	default: break;
	}
}

/* Input from the host: a buffer big enough for one maximal frame plus a read. */
static uint8_t *ib;
static size_t ib_len;
#define IB_CAP (2 * ((size_t)MAX_FRAME + 4))

static void port_read(void)
{
	ssize_t n = read(port_fd, ib + ib_len, IB_CAP - ib_len);
	if (n < 0) {
		if (errno == EINTR || errno == EAGAIN)
			return;
		if (!pid1)
			die("read from host: %s", strerror(errno));
		n = 0;
	}
	if (n == 0) {
		if (!pid1) {
			kill_all_execs();
			exit(0); /* host mode: the host closed the connection */
		}
		/* virtio port without a host on the other side: poll() would
		 * report POLLHUP forever, so look again a little later. */
		port_backoff_until = clock_ms(CLOCK_MONOTONIC) + 2; /* short: a restored clone's host is about to appear */
		return;
	}
	ib_len += (size_t)n;
	size_t p = 0;
	while (ib_len - p >= 4) {
		uint32_t len = be32(ib + p);
		if (len < 5 || len > MAX_FRAME) {
			/* No way to find the next frame boundary: drop what we have. */
			logmsg("invalid frame length %u: stream desynchronized, discarding %zu bytes",
			       len, ib_len - p);
			p = ib_len;
			break;
		}
		if (ib_len - p - 4 < len)
			break;
		handle_frame(ib + p + 4, len);
		p += 4 + (size_t)len;
	}
	memmove(ib, ib + p, ib_len - p);
	ib_len -= p;
}

/* ------------------------------------------------------------- loop */

enum { W_PORT, W_SIG, W_OUT, W_ERR, W_IN };

static void serve(int sig_fd)
{
	static struct pollfd pfds[2 + 3 * MAX_REQS];
	static struct { struct req *r; int what; } pmap[2 + 3 * MAX_REQS];
	ib = malloc(IB_CAP);
	if (!ib)
		die("out of memory");
	for (;;) {
		ob_flush();
		int64_t now = clock_ms(CLOCK_MONOTONIC);
		bool congested = ob_pending() >= OUTQ_HIGH;
		int timeout = -1;
		for (int i = 0; i < nreqs; i++) {
			struct req *r = reqs[i];
			if (r->dead)
				continue;
			if (r->kind == R_EXEC && r->deadline) {
				if (now >= r->deadline) {
					kill(-r->pid, SIGKILL);
					r->timed_out = true;
					r->deadline = 0;
				} else if (timeout < 0 || r->deadline - now < timeout) {
					timeout = (int)(r->deadline - now);
				}
			}
			if (r->kind == R_READ && !congested) {
				fs_read_step(r);
				if (!r->dead)
					timeout = 0; /* more to send: come right back */
			}
			if (r->kind == R_COPY) {
				fs_copy_step(r);
				if (!r->dead)
					timeout = 0;
			}
		}
		if (ob_pending())
			ob_flush();
		congested = ob_pending() >= OUTQ_HIGH;

		int n = 0;
		bool port_on = now >= port_backoff_until;
		if (port_on) {
			pfds[n] = (struct pollfd){.fd = port_fd, .events = POLLIN | (ob_pending() ? POLLOUT : 0)};
			pmap[n++].what = W_PORT;
		} else if (timeout < 0 || port_backoff_until - now < timeout) {
			timeout = (int)(port_backoff_until - now);
		}
		pfds[n] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
		pmap[n++].what = W_SIG;
		for (int i = 0; i < nreqs; i++) {
			struct req *r = reqs[i];
			if (r->dead || r->kind != R_EXEC)
				continue;
			bool room = out_room(r) > 0; /* a windowed exec waits for its ACK */
			if (!congested && room && r->out_fd >= 0) {
				pfds[n] = (struct pollfd){.fd = r->out_fd, .events = POLLIN};
				pmap[n].r = r;
				pmap[n++].what = W_OUT;
			}
			if (!congested && room && r->err_fd >= 0) {
				pfds[n] = (struct pollfd){.fd = r->err_fd, .events = POLLIN};
				pmap[n].r = r;
				pmap[n++].what = W_ERR;
			}
			if (r->in_fd >= 0 && r->inq_off < r->inq_len) {
				pfds[n] = (struct pollfd){.fd = r->in_fd, .events = POLLOUT};
				pmap[n].r = r;
				pmap[n++].what = W_IN;
			}
		}
		if (poll(pfds, (nfds_t)n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		bool port_readable = false;
		for (int i = 0; i < n; i++) {
			short ev = pfds[i].revents;
			if (!ev)
				continue;
			struct req *r = pmap[i].r;
			switch (pmap[i].what) {
			case W_PORT:
				port_readable = true;
				break;
			case W_SIG:
				reap_children(sig_fd);
				break;
			case W_OUT:
			case W_ERR: {
				int *fd = pmap[i].what == W_OUT ? &r->out_fd : &r->err_fd;
				if (r->dead || *fd != pfds[i].fd)
					break; /* finished earlier in this iteration */
				if (r->disowned) {
					discard_output(fd);
					break;
				}
				size_t max = out_room(r);
				if (!max)
					break; /* the other output used the window up in this iteration */
				ssize_t got = msg_read_data(r->id, pmap[i].what == W_OUT ? M_STDOUT : M_STDERR,
							    *fd, max);
				if (got > 0)
					r->unacked += got;
				if (got == 0 || (got < 0 && errno != EAGAIN))
					close_fd(fd); /* EOF: the child (and its children) closed it */
				else if (got >= PIPE_DEFAULT && !r->big_pipes)
					enlarge_pipes(r);
				break;
			}
			case W_IN:
				if (!r->dead && r->in_fd == pfds[i].fd)
					stdin_flush(r);
				break;
			}
		}
		/* Input last: new requests must not disturb this iteration's pmap. */
		if (port_readable)
			port_read();
		sweep_reqs();
	}
}

/* ------------------------------------------------------------- boot */

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags,
			 const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) < 0 && !(errno == EBUSY && !(flags & MS_MOVE)))
		die("mount %s on %s (%s): %s", src, dst, type ? type : "move", strerror(errno));
}

static void load_modules(void)
{
	FILE *f = fopen("/modules/order", "re");
	if (!f)
		return; /* everything built in */
	char line[PATH_MAX], path[PATH_MAX + 16];
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\r\n")] = 0;
		if (!line[0] || line[0] == '#')
			continue;
		snprintf(path, sizeof path, "%s%s", line[0] == '/' ? "" : "/modules/", line);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			logmsg("warning: module %s: %s", path, strerror(errno));
			continue;
		}
		size_t l = strlen(path);
		bool compressed = (l > 3 && !strcmp(path + l - 3, ".xz")) ||
				  (l > 4 && !strcmp(path + l - 4, ".zst")) ||
				  (l > 3 && !strcmp(path + l - 3, ".gz"));
		if (syscall(SYS_finit_module, fd, "", compressed ? MODULE_INIT_COMPRESSED_FILE : 0) < 0 &&
		    errno != EEXIST)
			logmsg("warning: cannot load module %s: %s", path, strerror(errno));
		close(fd);
	}
	fclose(f);
}

static bool find_disk(const char *serial, char *dev, size_t cap)
{
	DIR *d = opendir("/sys/block");
	if (!d)
		return false;
	struct dirent *e;
	bool found = false;
	while (!found && (e = readdir(d))) {
		char p[300], s[128];
		if (strncmp(e->d_name, "vd", 2) != 0)
			continue;
		snprintf(p, sizeof p, "/sys/block/%s/serial", e->d_name);
		if (read_small(p, s, sizeof s) >= 0 && !strcmp(s, serial)) {
			snprintf(dev, cap, "/dev/%s", e->d_name);
			found = access(dev, F_OK) == 0; /* devtmpfs may lag the sysfs entry */
		}
	}
	closedir(d);
	return found;
}

/* Mounts a read-only root layer: erofs, or a disk image's ext2/3/4 ("noload":
 * no journal replay on a read-only device); "auto" tries ext4, then erofs. */
static void mount_layer(const char *dev, const char *dir, const char *fstype)
{
	mkdir(dir, 0755);
	if (!strcmp(fstype, "auto")) {
		if (mount(dev, dir, "ext4", MS_RDONLY, "noload") == 0 ||
		    mount(dev, dir, "erofs", MS_RDONLY, NULL) == 0)
			return;
		die("mount %s on %s: no ext4 or erofs file system found (pass fstype)", dev, dir);
	}
	bool ext = !strncmp(fstype, "ext", 3);
	if (mount(dev, dir, fstype, MS_RDONLY, ext ? "noload" : NULL) < 0)
		die("mount %s on %s (%s): %s", dev, dir, fstype, strerror(errno));
}

/* Builds the overlay root from the read-only layers and switches into it.
 * Each entry is SERIAL or SERIAL:FSTYPE (erofs when absent). */
static void build_root(char *layers, const char *tmpfs_size)
{
	char lower[3072] = "", opts[4096], dev[300], dir[PATH_MAX];
	int64_t deadline = clock_ms(CLOCK_MONOTONIC) + 5000;
	mkdir("/layers", 0755);
	for (char *save = NULL, *serial = strtok_r(layers, ",", &save); serial;
	     serial = strtok_r(NULL, ",", &save)) {
		const char *fstype = "erofs";
		char *colon = strchr(serial, ':');
		if (colon) {
			*colon = 0;
			fstype = colon + 1;
		}
		/* Serials end up in overlay's option string: keep them boring. */
		for (const char *c = serial; *c; c++)
			if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
			      (*c >= '0' && *c <= '9') || *c == '-' || *c == '_' || *c == '.'))
				die("invalid layer serial '%s'", serial);
		for (const char *c = fstype; *c; c++)
			if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9')))
				die("invalid layer file system '%s'", fstype);
		/* virtio-blk probes asynchronously after its module loads. */
		while (!find_disk(serial, dev, sizeof dev)) {
			if (clock_ms(CLOCK_MONOTONIC) > deadline)
				die("no virtio-blk disk with serial '%s' after 5 s", serial);
			usleep(5000);
		}
		snprintf(dir, sizeof dir, "/layers/%s", serial);
		mount_layer(dev, dir, fstype);
		size_t l = strlen(lower);
		if (snprintf(lower + l, sizeof lower - l, "%s%s", l ? ":" : "", dir) >= (int)(sizeof lower - l))
			die("too many layers");
	}
	if (!lower[0])
		die("msb.layers is empty");
	snprintf(opts, sizeof opts, "size=%s,mode=0755", tmpfs_size);
	mount_or_die("tmpfs", "/rw", "tmpfs", 0, opts);
	mkdir("/rw/upper", 0755);
	mkdir("/rw/work", 0755);
	snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=/rw/upper,workdir=/rw/work", lower);
	mount_or_die("overlay", "/newroot", "overlay", 0, opts);
	mount_or_die("/dev", "/newroot/dev", NULL, MS_MOVE, NULL);
	mount_or_die("/proc", "/newroot/proc", NULL, MS_MOVE, NULL);
	mount_or_die("/sys", "/newroot/sys", NULL, MS_MOVE, NULL);
	/* switch_root: rootfs cannot be pivot_root'ed, so move the new root over / and chroot. */
	if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		die("switching to the new root: %s", strerror(errno));
}

static void init_system(void)
{
	char cmdline[4096], layers[2048] = "", tmpfs_size[64] = "50%";
	umask(022);
	mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	int c = open("/dev/console", O_RDWR | O_NOCTTY);
	if (c >= 0) { /* the kernel gives PID 1 the console only if /dev/console existed */
		dup2(c, 1);
		dup2(c, 2);
		if (c > 2)
			close(c);
	}
	mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	load_modules();
	if (read_small("/proc/cmdline", cmdline, sizeof cmdline) < 0)
		die("cannot read /proc/cmdline: %s", strerror(errno));
	for (char *save = NULL, *tok = strtok_r(cmdline, " \t\n", &save); tok;
	     tok = strtok_r(NULL, " \t\n", &save)) {
		if (!strncmp(tok, "msb.layers=", 11))
			snprintf(layers, sizeof layers, "%s", tok + 11);
		else if (!strncmp(tok, "msb.tmpfs=", 10) && strlen(tok + 10) < sizeof tmpfs_size &&
			 !strpbrk(tok + 10, ","))
			snprintf(tmpfs_size, sizeof tmpfs_size, "%s", tok + 10);
	}
	if (layers[0])
		build_root(layers, tmpfs_size);
	/* No tmpfs on /tmp: the overlay's upper dir is already in guest RAM, and a
	 * tmpfs would hide host trees imaged under /tmp (pytest's tmp_path projects). */
	mkdir("/tmp", 01777);
	chmod("/tmp", 01777);
	mount_or_die("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	/* Conveniences for test code (multiprocessing needs /dev/shm); not fatal. */
	mkdir("/dev/shm", 01777);
	if (mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
		logmsg("warning: /dev/shm: %s", strerror(errno));
	mkdir("/dev/pts", 0755);
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620") < 0)
		logmsg("warning: /dev/pts: %s", strerror(errno));
	if (sethostname("sandbox", 7) < 0)
		logmsg("warning: sethostname: %s", strerror(errno));
	hosts_map_hostname("sandbox", 7);
	loopback_up();
	net_prepare();
	setenv("PATH", DEFAULT_PATH, 1);
}

/* Finds the virtio-serial port named msb.agent; it may be probed late. */
static int open_port(void)
{
	int64_t deadline = clock_ms(CLOCK_MONOTONIC) + 10000;
	for (;;) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char p[300], name[64];
			if (e->d_name[0] == '.')
				continue;
			snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
			if (read_small(p, name, sizeof name) < 0 || strcmp(name, PORT_NAME) != 0)
				continue;
			snprintf(p, sizeof p, "/dev/%s", e->d_name);
			int fd = open(p, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		if (clock_ms(CLOCK_MONOTONIC) > deadline)
			die("no virtio-serial port named %s after 10 s", PORT_NAME);
		usleep(5000);
	}
}

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof sa.sun_path)
		die("socket path too long: %s", path);
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("connect %s: %s", path, strerror(errno));
	return fd;
}

/*
 * `agent --connect PORT`: relays stdin -> 127.0.0.1:PORT -> stdout.  The host
 * publishes a guest port (SandboxConfig.ports) by running this through EXEC
 * (as /proc/self/exe, which names the agent's binary in any root) for each
 * connection it accepts on its own 127.0.0.1.  Exit 111: nothing listens.
 */
static int connect_relay(const char *port_text)
{
	char *end;
	long port = strtol(port_text, &end, 10);
	if (*end || port < 1 || port > 65535)
		return 2;
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (s < 0 || connect(s, (struct sockaddr *)&sin, sizeof sin) < 0)
		return errno == ECONNREFUSED ? 111 : 1;
	struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = s, .events = POLLIN}};
	static char buf[65536];
	bool in_open = true;
	for (;;) {
		p[0].fd = in_open ? 0 : -1;
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (in_open && p[0].revents) {
			ssize_t n = read(0, buf, sizeof buf);
			if (n <= 0) {
				in_open = false;
				shutdown(s, SHUT_WR);
			} else {
				write_all_fd(s, buf, (size_t)n);
			}
		}
		if (p[1].revents) {
			ssize_t n = read(s, buf, sizeof buf);
			if (n <= 0)
				return 0;
			write_all_fd(1, buf, (size_t)n);
		}
	}
}

/*
 * `agent --connect-udp PORT`: the UDP form of --connect, for one host peer of
 * a published UDP port.  Datagrams cross stdin/stdout each after its 2-byte
 * big-endian length; a connected socket to 127.0.0.1:PORT sends them and
 * reads the replies.  Ends when stdin closes (the host's idle timeout).
 */
static int connect_udp_relay(const char *port_text)
{
	char *end;
	long port = strtol(port_text, &end, 10);
	if (*end || port < 1 || port > 65535)
		return 2;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (s < 0 || connect(s, (struct sockaddr *)&sin, sizeof sin) < 0)
		return 1;
	struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = s, .events = POLLIN}};
	static char in[2 * 65538], out[2 + 65535];
	size_t have = 0;
	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (p[0].revents) {
			ssize_t n = read(0, in + have, sizeof in - have);
			if (n <= 0)
				return 0;
			have += (size_t)n;
			size_t at = 0;
			while (have - at >= 2) {
				size_t len = ((size_t)(unsigned char)in[at] << 8) | (unsigned char)in[at + 1];
				if (have - at < 2 + len)
					break;
				/* Nothing listens (yet): the datagram is lost, as UDP's would be. */
				(void)send(s, in + at + 2, len, 0);
				at += 2 + len;
			}
			memmove(in, in + at, have - at);
			have -= at;
		}
		if (p[1].revents) {
			ssize_t n = recv(s, out + 2, sizeof out - 2, 0);
			if (n < 0)
				continue; /* ECONNREFUSED from an earlier send: ignore */
			out[0] = (char)((n >> 8) & 0xff);
			out[1] = (char)(n & 0xff);
			write_all_fd(1, out, (size_t)n + 2);
		}
	}
}

/*
 * `agent --stream PORT TOKEN [VPORT]`: the guest end of the stream path (docs/network.md,
 * "Stream path").  Listens on 127.0.0.1:PORT, where the guest's nftables
 * rule (set by the host) redirects outbound TCP; each accepted connection's
 * original destination (SO_ORIGINAL_DST) goes to the host, which decides it
 * like a WireGuard flow before any host socket opens, and the bytes cross
 * the virtio-serial port named VPORT (else this process's stdin/stdout, the
 * agent channel: ~6x slower under TCG) as frames:
 *   type u8, id u32, len u32 (big endian), then len bytes (<= SM_MAX_DATA).
 * Guest -> host: READY (TOKEN), OPEN (family 4 or 6, address, port), DATA, EOF, CLOSE,
 * ACK (u32: bytes of the host's DATA written to the socket).  Host -> guest:
 * DATA, EOF (shutdown), CLOSE (reset), ACK (u32: guest bytes consumed).
 * Host -> guest keeps at most SM_DOWN_WINDOW bytes unacknowledged per
 * connection, guest -> host SM_UP_WINDOW (the host's memory is the scarcer),
 * so neither buffers more than that.  Nothing here is trusted by the host.
 */
enum { SM_READY = 0, SM_OPEN = 1, SM_DATA = 2, SM_EOF = 3, SM_CLOSE = 4, SM_ACK = 5 };
#define SM_MAX_DATA 65536u
#define SM_DOWN_WINDOW (2048u * 1024u)
#define SM_UP_WINDOW (256u * 1024u)
#define SM_MAX_CONNS 1024
#define SM_PIDFILE "/run/msb-stream.pid"
#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif

struct sconn {
	int fd; /* -1: free slot */
	uint32_t id;
	char *out; /* host bytes not yet written to the socket */
	size_t out_off, out_len, out_cap; /* unwritten: out[out_off, out_len) */
	uint32_t up_unacked; /* guest bytes sent to the host, not yet acknowledged */
	uint32_t down_unacked; /* host bytes written to the socket, not yet acknowledged */
	bool rd_done, eof_in;
};

static void sm_put32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

static uint32_t sm_get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Frames cross stdin/stdout, or a virtio-serial port of their own. */
static int sm_in = 0, sm_out = 1;

static void sm_send(uint8_t type, uint32_t id, const void *data, uint32_t len)
{
	static unsigned char frame[9 + SM_MAX_DATA];
	frame[0] = type;
	sm_put32(frame + 1, id);
	sm_put32(frame + 5, len);
	if (len)
		memcpy(frame + 9, data, len);
	write_all_fd(sm_out, (const char *)frame, 9 + (size_t)len);
}

static void sm_free(struct sconn *c, bool reset)
{
	if (reset) {
		struct linger l = {1, 0};
		setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
	}
	close(c->fd);
	free(c->out);
	memset(c, 0, sizeof *c);
	c->fd = -1;
}

/* Both directions ended: tell the host and free the slot. */
static void sm_maybe_done(struct sconn *c)
{
	if (c->rd_done && c->eof_in && c->out_len == 0) {
		sm_send(SM_CLOSE, c->id, NULL, 0);
		sm_free(c, false);
	}
}

static void sm_flush(struct sconn *c)
{
	size_t done = 0;
	while (c->out_off + done < c->out_len) {
		ssize_t w = write(c->fd, c->out + c->out_off + done, c->out_len - c->out_off - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (w <= 0) {
			sm_send(SM_CLOSE, c->id, NULL, 0);
			sm_free(c, true);
			return;
		}
		done += (size_t)w;
	}
	if (done) {
		/* No memmove per write (under TCG it cost more than the write):
		 * the buffer is compacted only when an append needs the room. */
		c->out_off += done;
		if (c->out_off == c->out_len)
			c->out_off = c->out_len = 0;
		/* Acknowledged in quarters of the window: each frame costs the guest
		 * a trip through the agent, and the host keeps >= 3/4 of it. */
		c->down_unacked += (uint32_t)done;
		if (c->down_unacked >= SM_DOWN_WINDOW / 4) {
			unsigned char n[4];
			sm_put32(n, c->down_unacked);
			sm_send(SM_ACK, c->id, n, 4);
			c->down_unacked = 0;
		}
	}
	if (c->out_len == 0 && c->eof_in) {
		shutdown(c->fd, SHUT_WR);
		sm_maybe_done(c);
	}
}

static struct sconn *sm_find(struct sconn *conns, uint32_t id)
{
	for (int i = 0; i < SM_MAX_CONNS; i++)
		if (conns[i].fd >= 0 && conns[i].id == id)
			return &conns[i];
	return NULL;
}

/* Opens the virtio-serial port named `name` (its /dev node), or -1. */
static int open_vport(const char *name)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int fd = -1;
	while (fd < 0 && (e = readdir(d))) {
		char path[PATH_MAX], text[64];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		if (read_small(path, text, sizeof text) < 0 || strcmp(text, name))
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		/* Busy while a killed predecessor still holds it. */
		for (int tries = 0; tries < 200; tries++) {
			fd = open(path, O_RDWR | O_CLOEXEC);
			if (fd >= 0 || errno != EBUSY)
				break;
			usleep(10000);
		}
	}
	closedir(d);
	return fd;
}

static int stream_mux(const char *port_text, const char *token, const char *vport)
{
	char *end;
	long port = strtol(port_text, &end, 10);
	if (*end || port < 1 || port > 65535)
		return 2;
	/* A restored snapshot may hold the previous sandbox's mux, whose host end
	 * is gone: end it, and take its port. */
	char old[32];
	if (read_small(SM_PIDFILE, old, sizeof old) > 0) {
		long pid = strtol(old, &end, 10);
		if (!*end && pid > 1 && pid != getpid())
			kill((pid_t)pid, SIGKILL);
	}
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	int one = 1;
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
		return 1;
	for (int tries = 0; bind(ls, (struct sockaddr *)&sin, sizeof sin) < 0; tries++) {
		if (errno != EADDRINUSE || tries == 200)
			return 1;
		usleep(10000); /* the killed mux's socket closes */
	}
	if (listen(ls, 128) < 0)
		return 1;
	if (vport) {
		sm_in = sm_out = open_vport(vport);
		if (sm_in < 0)
			return 1;
		/* Over its own port it needs no EXEC: it leaves the agent's
		 * bookkeeping (the EXEC ends now, exit 0 = listening), so a capture
		 * holds no running EXEC whose id a restored session could reuse.
		 * It ends when the host closes the port (EOF) or the VM does. */
		pid_t child = fork();
		if (child < 0)
			return 1;
		if (child > 0)
			_exit(0);
		setsid();
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
		}
	}
	int pf = open(SM_PIDFILE, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (pf >= 0) {
		dprintf(pf, "%d\n", (int)getpid());
		close(pf);
	}
	/* IPv6 too, when the guest has it (its rule redirects to [::1]:PORT). */
	int ls6 = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
	sin6.sin6_addr = in6addr_loopback;
	if (ls6 >= 0 && (setsockopt(ls6, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
			 setsockopt(ls6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0 ||
			 bind(ls6, (struct sockaddr *)&sin6, sizeof sin6) < 0 || listen(ls6, 128) < 0)) {
		close(ls6);
		ls6 = -1;
	}
	static struct sconn conns[SM_MAX_CONNS];
	static struct pollfd pfds[2 + SM_MAX_CONNS];
	static int slot[2 + SM_MAX_CONNS];
	static unsigned char in[2 * (9 + SM_MAX_DATA)];
	size_t have = 0;
	uint32_t next_id = 1;
	for (int i = 0; i < SM_MAX_CONNS; i++)
		conns[i].fd = -1;
	/* The host drops whatever precedes this (a captured predecessor's frames). */
	size_t tl = strlen(token);
	sm_send(SM_READY, 0, token, (uint32_t)(tl < 256 ? tl : 256));
	for (;;) {
		int n = 3;
		pfds[0] = (struct pollfd){.fd = sm_in, .events = POLLIN};
		for (int i = 0; i < SM_MAX_CONNS; i++) {
			struct sconn *c = &conns[i];
			if (c->fd < 0)
				continue;
			short ev = 0;
			if (!c->rd_done && c->up_unacked < SM_UP_WINDOW)
				ev |= POLLIN;
			if (c->out_len)
				ev |= POLLOUT;
			slot[n] = i;
			pfds[n++] = (struct pollfd){.fd = c->fd, .events = ev};
		}
		/* Full: new connections wait in the backlog. */
		pfds[1] = (struct pollfd){.fd = n - 3 < SM_MAX_CONNS ? ls : -1, .events = POLLIN};
		pfds[2] = (struct pollfd){.fd = n - 3 < SM_MAX_CONNS ? ls6 : -1, .events = POLLIN};
		if (poll(pfds, (nfds_t)n, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		for (int k = 3; k < n; k++) {
			struct sconn *c = &conns[slot[k]];
			if (c->fd != pfds[k].fd || !pfds[k].revents)
				continue;
			if (pfds[k].revents & POLLOUT)
				sm_flush(c);
			if (c->fd >= 0 && c->rd_done && (pfds[k].revents & (POLLERR | POLLHUP))) {
				/* Reset, or shut both ways: nothing more can cross (no busy loop). */
				sm_send(SM_CLOSE, c->id, NULL, 0);
				sm_free(c, false);
				continue;
			}
			if (c->fd < 0 || c->rd_done || c->up_unacked >= SM_UP_WINDOW ||
			    !(pfds[k].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			static char buf[SM_MAX_DATA];
			size_t room = SM_UP_WINDOW - c->up_unacked;
			ssize_t r = read(c->fd, buf, room < sizeof buf ? room : sizeof buf);
			if (r > 0) {
				c->up_unacked += (uint32_t)r;
				sm_send(SM_DATA, c->id, buf, (uint32_t)r);
			} else if (r == 0) {
				c->rd_done = true;
				sm_send(SM_EOF, c->id, NULL, 0);
				sm_maybe_done(c);
			} else if (errno != EAGAIN && errno != EINTR) {
				sm_send(SM_CLOSE, c->id, NULL, 0);
				sm_free(c, true);
			}
		}
		for (int l = 1; l <= 2; l++) {
			if (!(pfds[l].revents & POLLIN))
				continue;
			int s = accept4(pfds[l].fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
			struct sockaddr_storage dst;
			socklen_t dl = sizeof dst;
			unsigned char o[19];
			size_t olen = 0;
			if (s >= 0 && l == 1 &&
			    getsockopt(s, SOL_IP, SO_ORIGINAL_DST, &dst, &dl) == 0 &&
			    dst.ss_family == AF_INET) {
				struct sockaddr_in *d4 = (struct sockaddr_in *)&dst;
				o[0] = 4;
				memcpy(o + 1, &d4->sin_addr, 4);
				memcpy(o + 5, &d4->sin_port, 2);
				olen = 7;
			} else if (s >= 0 && l == 2 &&
				   getsockopt(s, SOL_IPV6, SO_ORIGINAL_DST, &dst, &dl) == 0 &&
				   dst.ss_family == AF_INET6) {
				struct sockaddr_in6 *d6 = (struct sockaddr_in6 *)&dst;
				o[0] = 6;
				memcpy(o + 1, &d6->sin6_addr, 16);
				memcpy(o + 17, &d6->sin6_port, 2);
				olen = 19;
			}
			for (int i = 0; olen && i < SM_MAX_CONNS; i++) {
				if (conns[i].fd >= 0)
					continue;
				conns[i].fd = s;
				conns[i].id = next_id++;
				s = -1;
				sm_send(SM_OPEN, conns[i].id, o, (uint32_t)olen);
				break;
			}
			if (s >= 0)
				close(s); /* not redirected, or full */
		}
		if (pfds[0].revents) {
			ssize_t r = read(sm_in, in + have, sizeof in - have);
			if (r <= 0)
				return 0; /* the host ended the stream path */
			have += (size_t)r;
			size_t at = 0;
			while (have - at >= 9) {
				uint8_t type = in[at];
				uint32_t id = sm_get32(in + at + 1), len = sm_get32(in + at + 5);
				if (len > SM_MAX_DATA)
					return 3; /* out of step: nothing after this can be trusted */
				if (have - at < 9 + (size_t)len)
					break;
				const unsigned char *p = in + at + 9;
				at += 9 + (size_t)len;
				struct sconn *c = sm_find(conns, id);
				if (!c)
					continue; /* closed meanwhile */
				if (type == SM_DATA && !c->eof_in) {
					if (c->out_len - c->out_off + len > SM_DOWN_WINDOW) {
						sm_send(SM_CLOSE, c->id, NULL, 0);
						sm_free(c, true);
						continue;
					}
					if (c->out_len + len > c->out_cap && c->out_off) {
						memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
						c->out_len -= c->out_off;
						c->out_off = 0;
					}
					if (c->out_len + len > c->out_cap) {
						size_t cap = c->out_len + len < 65536 ? 65536 : SM_DOWN_WINDOW;
						char *grown = realloc(c->out, cap);
						if (!grown)
							return 1;
						c->out = grown;
						c->out_cap = cap;
					}
					memcpy(c->out + c->out_len, p, len);
					c->out_len += len;
					sm_flush(c);
				} else if (type == SM_EOF) {
					c->eof_in = true;
					sm_flush(c);
				} else if (type == SM_CLOSE) {
					sm_free(c, true);
				} else if (type == SM_ACK && len == 4) {
					uint32_t a = sm_get32(p);
					c->up_unacked -= a < c->up_unacked ? a : c->up_unacked;
				}
			}
			memmove(in, in + at, have - at);
			have -= at;
		}
	}
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if ((argc == 4 || argc == 5) && !strcmp(argv[1], "--stream"))
		return stream_mux(argv[2], argv[3], argc == 5 ? argv[4] : NULL);
	if (argc == 3 && !strcmp(argv[1], "--connect"))
		return connect_relay(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "--connect-udp"))
		return connect_udp_relay(argv[2]);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--serve-fd") && i + 1 < argc) {
			port_fd = atoi(argv[++i]);
		} else if (!strcmp(argv[i], "--serve-unix") && i + 1 < argc) {
			port_fd = connect_unix(argv[++i]);
		} else if (!strcmp(argv[i], "--version")) {
			printf("msb-agent %s (protocol %d)\n", AGENT_VERSION, PROTO_VERSION);
			return 0;
		} else {
			fprintf(stderr, "usage: %s [--serve-fd N | --serve-unix PATH | --version]\n", argv[0]);
			return 2;
		}
	}
	if (port_fd < 0) {
		if (getpid() != 1) {
			fprintf(stderr, "msb-agent: not PID 1; use --serve-fd N or --serve-unix PATH\n");
			return 2;
		}
		pid1 = true;
		init_system();
		port_fd = open_port();
	}
	/* Keep fds 0-2 taken so pipes never land there (children dup2 onto them). */
	for (;;) {
		int fd = open("/dev/null", O_RDWR);
		if (fd > 2)
			close(fd);
		if (fd < 0 || fd > 2)
			break;
	}
	if (getrlimit(RLIMIT_NOFILE, &nofile_orig) == 0) {
		struct rlimit rl = {nofile_orig.rlim_max, nofile_orig.rlim_max};
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (fcntl(port_fd, F_SETFL, fcntl(port_fd, F_GETFL) | O_NONBLOCK) < 0 ||
	    fcntl(port_fd, F_SETFD, FD_CLOEXEC) < 0)
		die("bad port fd %d: %s", port_fd, strerror(errno));
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sig_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sig_fd < 0)
		die("signalfd: %s", strerror(errno));
	msg_begin(0, M_READY);
	f_int(T_VERSION, PROTO_VERSION);
	f_str(T_AGENT_VERSION, AGENT_VERSION);
	f_int(T_UPTIME_MS, clock_ms(CLOCK_BOOTTIME));
	msg_end();
	serve(sig_fd);
	return 0;
}
