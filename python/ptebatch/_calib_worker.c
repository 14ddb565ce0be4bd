/*
 * The process `ptebatch calibrate` times (see ptebatch/calibrate.py). A small C program, so
 * that the process that forks has almost no page table of its own besides the region.
 *
 * One command per line on stdin, one JSON object per line on stdout (an error is
 * {"op": "error", "error": "..."} and the worker exits 1). Times are CLOCK_MONOTONIC ns.
 *
 *   map LEN ALIGN SPLIT  map LEN bytes of private anonymous memory at an ALIGN-aligned
 *                        address, MADV_HUGEPAGE, write one byte per page (timed: faults_ns);
 *                        SPLIT=1 then PTE-maps every PMD-mapped THP by mprotect()ing one page
 *                        of each PMD and back; then MADV_NOHUGEPAGE so khugepaged leaves the
 *                        region alone. Answers pid, addr, len, faults_ns.
 *   unmap                munmap the region (untimed).
 *   exit-round           fork (fork_ns: the parent's fork() call); the child answers ready and
 *                        waits on a pipe; then child_exit_ns: from the parent's write of the
 *                        exit command to the child's pipe until waitpid() has reaped it;
 *                        then parent_munmap_ns: the parent's munmap of the region.
 *   munmap-round         fork (fork_ns); the child munmaps the region (child_munmap_ns,
 *                        timed by the child and sent back) and exits; the parent reaps it,
 *                        then munmaps the region (parent_munmap_ns).
 *   bare                 fork_ns and child_exit_ns as above with no region mapped.
 *   quit                 exit 0 (also at end of input).
 *
 * The worker runs at nice -20 when it may (root): on a shared machine the other tasks then
 * preempt it less, and the times are less noisy. The first line it prints is
 * {"op": "start", "nice": N}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long page;
static char *region;
static size_t region_len;

static int64_t now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void fail(const char *what)
{
	printf("{\"op\": \"error\", \"error\": \"%s: %s\"}\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static void map_region(size_t len, size_t align, int split)
{
	char *base, *start;
	size_t head, off;
	int64_t t0, t1;

	if (region)
		fail("map: a region is already mapped");
	if (len == 0 || align < (size_t)page || len % align)
		fail("map: bad length or alignment");
	base = mmap(NULL, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		fail("mmap");
	/* Trim to an aligned region that is a VMA of its own. */
	head = (align - (uintptr_t)base % align) % align;
	start = base + head;
	if (head && munmap(base, head))
		fail("munmap");
	if (align - head && munmap(start + len, align - head))
		fail("munmap");
	region = start;
	region_len = len;
	/* Direct compaction for the large folios when defrag is "madvise" (the default). */
	if (madvise(region, len, MADV_HUGEPAGE))
		fail("madvise(MADV_HUGEPAGE)");
	t0 = now();
	/* Stores only: a load first would map the zero page and the store would then copy into
	 * an order-0 page. */
	for (off = 0; off < len; off += page)
		((volatile char *)region)[off] = 1;
	t1 = now();
	if (split) {
		for (off = 0; off < len; off += align) {
			if (mprotect(region + off, page, PROT_READ))
				fail("mprotect");
			if (mprotect(region + off, page, PROT_READ | PROT_WRITE))
				fail("mprotect");
		}
	}
	if (madvise(region, len, MADV_NOHUGEPAGE))
		fail("madvise(MADV_NOHUGEPAGE)");
	printf("{\"op\": \"map\", \"pid\": %d, \"addr\": %lu, \"len\": %zu, \"faults_ns\": %lld}\n",
	       (int)getpid(), (unsigned long)(uintptr_t)region, len, (long long)(t1 - t0));
}

static int64_t unmap_region(void)
{
	int64_t t0, t1;

	if (!region)
		return 0;
	t0 = now();
	if (munmap(region, region_len))
		fail("munmap");
	t1 = now();
	region = NULL;
	region_len = 0;
	return t1 - t0;
}

static void child(int cmd_fd, int reply_fd)
{
	char c = 'r';
	int64_t t0, t1;

	if (write(reply_fd, &c, 1) != 1)
		_exit(1);
	if (read(cmd_fd, &c, 1) != 1)
		_exit(0);
	if (c == 'm') {
		t0 = now();
		if (munmap(region, region_len))
			_exit(1);
		t1 = now();
		t1 -= t0;
		if (write(reply_fd, &t1, sizeof(t1)) != sizeof(t1))
			_exit(1);
	}
	_exit(0);
}

/* kind: 'x' child exit, 'm' child munmap. */
static void round_(const char *op, char kind, int has_region)
{
	int cmd[2], reply[2], status;
	int64_t t0, t1, fork_ns, child_ns = 0, munmap_ns;
	pid_t pid;
	char c;

	if (has_region && !region)
		fail("round: no region mapped");
	if (pipe(cmd) || pipe(reply))
		fail("pipe");
	fflush(stdout);
	t0 = now();
	pid = fork();
	t1 = now();
	if (pid < 0)
		fail("fork");
	if (pid == 0) {
		close(cmd[1]);
		close(reply[0]);
		child(cmd[0], reply[1]);
	}
	fork_ns = t1 - t0;
	close(cmd[0]);
	close(reply[1]);
	if (read(reply[0], &c, 1) != 1)
		fail("child did not start");
	if (kind == 'x') {
		t0 = now();
		if (write(cmd[1], &kind, 1) != 1)
			fail("write to child");
		if (waitpid(pid, &status, 0) != pid)
			fail("waitpid");
		child_ns = now() - t0;
	} else {
		if (write(cmd[1], &kind, 1) != 1)
			fail("write to child");
		if (read(reply[0], &child_ns, sizeof(child_ns)) != sizeof(child_ns))
			fail("child munmap");
		if (waitpid(pid, &status, 0) != pid)
			fail("waitpid");
	}
	close(cmd[1]);
	close(reply[0]);
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		errno = ECHILD;
		fail("child failed");
	}
	munmap_ns = unmap_region();
	if (!has_region)
		printf("{\"op\": \"%s\", \"fork_ns\": %lld, \"child_exit_ns\": %lld}\n", op,
		       (long long)fork_ns, (long long)child_ns);
	else
		printf("{\"op\": \"%s\", \"fork_ns\": %lld, \"%s\": %lld, \"parent_munmap_ns\": %lld}\n", op,
		       (long long)fork_ns, kind == 'x' ? "child_exit_ns" : "child_munmap_ns",
		       (long long)child_ns, (long long)munmap_ns);
}

int main(void)
{
	char line[256], op[32];
	unsigned long long len, align;
	int split;

	page = sysconf(_SC_PAGESIZE);
	/* Die with the driver; Ctrl-C is the driver's to handle (it closes our stdin). */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	signal(SIGINT, SIG_IGN);
	errno = 0;
	setpriority(PRIO_PROCESS, 0, -20);
	errno = 0;
	printf("{\"op\": \"start\", \"nice\": %d}\n", getpriority(PRIO_PROCESS, 0));
	if (errno)
		fail("getpriority");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "%31s", op) != 1)
			continue;
		if (!strcmp(op, "map") && sscanf(line, "%*s %llu %llu %d", &len, &align, &split) == 3)
			map_region(len, align, split);
		else if (!strcmp(op, "unmap")) {
			unmap_region();
			printf("{\"op\": \"unmap\"}\n");
		} else if (!strcmp(op, "exit-round"))
			round_(op, 'x', 1);
		else if (!strcmp(op, "munmap-round"))
			round_(op, 'm', 1);
		else if (!strcmp(op, "bare"))
			round_(op, 'x', 0);
		else if (!strcmp(op, "quit"))
			break;
		else {
			errno = EINVAL;
			fail("unknown command");
		}
		fflush(stdout);
	}
	return 0;
}
