/*
 * msb-launch: exec QEMU with two process settings Python cannot give a child
 * without an unsafe preexec_fn, and keep its console log bounded.
 *
 *   msb-launch PARENT_PID [--console PATH --console-max BYTES] -- QEMU ARGS...
 *
 * 1. PR_SET_PDEATHSIG(SIGKILL): QEMU dies with the process that started it
 *    (what `setpriv --pdeathsig KILL` did before). If that parent is already
 *    gone when the signal is armed, exit at once instead of running orphaned.
 *
 * 2. A seccomp filter that fails madvise(MADV_HUGEPAGE) on ranges of at most
 *    2 MiB with EINVAL (QEMU ignores the result). QEMU asks for transparent
 *    huge pages on every RAM block; the ACPI table block is 2 MiB of address
 *    space holding ~4 KiB, so with THP it costs each clone a whole 2 MiB page.
 *    Larger ranges (guest RAM, the TCG code buffer, where huge pages speed up
 *    execution) keep their advice. Everything else is allowed: the filter
 *    only ever turns that one hint down, and no_new_privs only stops set-id
 *    programs from gaining privileges, which QEMU never execs.
 *
 * 3. With --console: the guest's serial console is guest data written on the
 *    host, so it must not grow without bound (guest root can write to
 *    /dev/ttyS0 forever). QEMU gets the write end of a pipe as fd 3 (its
 *    chardev path is /proc/self/fd/3); a forked keeper process copies the
 *    pipe into PATH and, whenever the file would pass BYTES, keeps only its
 *    last half. The keeper ends when QEMU's end of the pipe closes.
 *
 * Exit status 127: bad usage, the parent is gone, or the exec failed
 * (message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__x86_64__)
#define MSB_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define MSB_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#define MSB_SMALL_RANGE (2UL << 20)
#define ARG_LO(n) (offsetof(struct seccomp_data, args) + 8 * (n))
#define ARG_HI(n) (ARG_LO(n) + 4) /* little-endian hosts */

static int install_filter(void)
{
#ifdef MSB_AUDIT_ARCH
	struct sock_filter code[] = {
		/* Another ABI (e.g. x32 or i386 syscalls): leave it alone. */
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MSB_AUDIT_ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 0, 6),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(2)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MADV_HUGEPAGE, 0, 4),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_HI(1)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(1)),
		BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, MSB_SMALL_RANGE, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EINVAL & SECCOMP_RET_DATA)),
	};
	struct sock_fprog prog = {
		.len = (unsigned short)(sizeof(code) / sizeof(code[0])),
		.filter = code,
	};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return -1;
	return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
#else
	return 0; /* unknown host ABI: launch without the filter */
#endif
}

static int write_all(int fd, const char *buf, size_t len, off_t at)
{
	while (len > 0) {
		ssize_t n = pwrite(fd, buf, len, at);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
		at += n;
	}
	return 0;
}

/* Copy `in` to `path` until EOF, never letting the file pass `max` bytes. */
static void keep_console(int in, const char *path, long max)
{
	static char buf[65536];
	long keep = max / 2, size = 0;
	char *tail = malloc((size_t)keep);
	int out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);

	for (;;) {
		ssize_t n = read(in, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (out < 0 || tail == NULL)
			continue; /* nowhere to keep it: drain, so QEMU never blocks */
		if (size + n > max) {
			/* Keep the newest half (plus what just came, trimmed to fit). */
			long have = size < keep ? size : keep;
			if (pread(out, tail, (size_t)have, size - have) != have)
				have = 0;
			if (write_all(out, tail, (size_t)have, 0) != 0 || ftruncate(out, have) != 0)
				have = 0;
			size = have;
			if (n > max - size) {
				memmove(buf, buf + (n - (max - size)), (size_t)(max - size));
				n = max - size;
			}
		}
		if (write_all(out, buf, (size_t)n, size) == 0)
			size += n;
	}
	_exit(0);
}

/* Start the console keeper; QEMU's end of its pipe becomes fd 3. */
static int start_console_keeper(const char *path, long max)
{
	int pipefd[2];
	pid_t pid;

	if (pipe(pipefd) != 0)
		return -1;
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		close(pipefd[1]);
		keep_console(pipefd[0], path, max);
	}
	close(pipefd[0]);
	if (pipefd[1] != 3) {
		if (dup2(pipefd[1], 3) < 0)
			return -1;
		close(pipefd[1]);
	}
	return 0;
}

int main(int argc, char **argv)
{
	char *end = NULL;
	const char *console = NULL;
	long parent, console_max = 0;
	int arg = 2;

	if (argc >= 7 && strcmp(argv[2], "--console") == 0 &&
	    strcmp(argv[4], "--console-max") == 0) {
		console = argv[3];
		errno = 0;
		console_max = strtol(argv[5], &end, 10);
		if (errno != 0 || end == argv[5] || *end != '\0' || console_max < 4096) {
			fprintf(stderr, "%s: bad --console-max %s\n", argv[0], argv[5]);
			return 127;
		}
		arg = 6;
	}
	if (argc < arg + 2 || strcmp(argv[arg], "--") != 0) {
		fprintf(stderr,
			"usage: %s PARENT_PID [--console PATH --console-max BYTES] -- PROGRAM [ARGS...]\n",
			argv[0]);
		return 127;
	}
	errno = 0;
	parent = strtol(argv[1], &end, 10);
	if (errno != 0 || end == argv[1] || *end != '\0' || parent <= 0) {
		fprintf(stderr, "%s: bad parent pid %s\n", argv[0], argv[1]);
		return 127;
	}
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) {
		perror("msb-launch: PR_SET_PDEATHSIG");
		return 127;
	}
	if ((long)getppid() != parent)
		return 127; /* the parent died before the signal was armed */
	/* Only a memory saving: without seccomp (old kernel, a container that
	 * forbids it) QEMU runs as it would have anyway. */
	if (console != NULL && start_console_keeper(console, console_max) != 0) {
		perror("msb-launch: console keeper");
		return 127;
	}
	if (install_filter() != 0)
		perror("msb-launch: seccomp filter not installed");
	execv(argv[arg + 1], argv + arg + 1);
	fprintf(stderr, "msb-launch: cannot exec %s: %s\n", argv[arg + 1], strerror(errno));
	return 127;
}
