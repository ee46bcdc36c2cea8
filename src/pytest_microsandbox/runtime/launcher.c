/*
 * msb-launch: exec QEMU with two process settings Python cannot give a child
 * without an unsafe preexec_fn.
 *
 *   msb-launch PARENT_PID -- /usr/bin/qemu-system-x86_64 ARGS...
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
 * Exit status 127: bad usage, the parent is gone, or the exec failed
 * (message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
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

int main(int argc, char **argv)
{
	char *end = NULL;
	long parent;

	if (argc < 4 || strcmp(argv[2], "--") != 0) {
		fprintf(stderr, "usage: %s PARENT_PID -- PROGRAM [ARGS...]\n", argv[0]);
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
	if (install_filter() != 0)
		perror("msb-launch: seccomp filter not installed");
	execv(argv[3], argv + 3);
	fprintf(stderr, "msb-launch: cannot exec %s: %s\n", argv[3], strerror(errno));
	return 127;
}
