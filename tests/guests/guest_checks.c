/* User-space checks run by the boot tier's init inside the guest.
 *
 *   guest_checks seccomp   a seccomp filter must take effect: getppid gets
 *                          EPERM under an ERRNO rule, and the process dies
 *                          of SIGSYS under a KILL rule. On PVM hosts this
 *                          proves system calls pass through the kernel's
 *                          normal entry work (the project's syscall patch).
 *   guest_checks vsock-connect PORT MSG
 *                          connects to the host (CID 2) on PORT over vsock,
 *                          sends MSG, prints what comes back until EOF.
 *   guest_checks vsock-listen PORT
 *                          accepts one vsock connection on PORT, reads a
 *                          line and answers "echo:<line>".
 *   guest_checks forks N   N children, each touching thread-local storage
 *                          (errno) and exiting with a value the parent
 *                          checks: catches a wrong FS base after a context
 *                          switch, which was seen once on 2-vCPU PVM guests.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/vm_sockets.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static __thread long tls_value;

static int install(unsigned int action) {
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getppid, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, action),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return -1;
	return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

static int check_seccomp(void) {
	int ok = 1, status;
	pid_t pid = fork();
	if (pid == 0) {
		if (install(SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)) != 0)
			_exit(2);
		long r = syscall(SYS_getppid);
		_exit(r == -1 && errno == EPERM ? 0 : 3);
	}
	waitpid(pid, &status, 0);
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
		printf("SECCOMP-ERRNO-OK\n");
	} else {
		printf("SECCOMP-ERRNO-FAIL status=%#x\n", status);
		ok = 0;
	}
	pid = fork();
	if (pid == 0) {
		if (install(SECCOMP_RET_KILL_PROCESS) != 0)
			_exit(2);
		syscall(SYS_getppid);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS) {
		printf("SECCOMP-KILL-OK\n");
	} else {
		printf("SECCOMP-KILL-FAIL status=%#x\n", status);
		ok = 0;
	}
	/* The unfiltered parent still gets its real parent. */
	if (getppid() <= 0) {
		printf("SECCOMP-PARENT-FAIL\n");
		ok = 0;
	}
	return ok ? 0 : 1;
}

static int check_forks(int n) {
	int bad = 0;
	for (int i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			tls_value = i * 7 + 1;
			errno = 0;
			(void)getpid();
			_exit((int)(tls_value % 200) + (errno != 0));
		}
		if (pid < 0) {
			bad++;
			continue;
		}
		int status;
		if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
		    WEXITSTATUS(status) != (i * 7 + 1) % 200) {
			printf("FORK-FAIL child=%d status=%#x\n", i, status);
			bad++;
		}
	}
	if (bad == 0)
		printf("FORKS-OK n=%d\n", n);
	return bad ? 1 : 0;
}

static int vsock_connect(unsigned port, const char *msg) {
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		printf("VSOCK-CONNECT-FAIL %s\n", strerror(errno));
		return 1;
	}
	if (write(fd, msg, strlen(msg)) != (ssize_t)strlen(msg)) {
		printf("VSOCK-CONNECT-FAIL write %s\n", strerror(errno));
		return 1;
	}
	shutdown(fd, SHUT_WR);
	char buf[256];
	size_t got = 0;
	ssize_t n;
	while (got < sizeof(buf) - 1 && (n = read(fd, buf + got, sizeof(buf) - 1 - got)) > 0)
		got += n;
	buf[got] = 0;
	printf("VSOCK-CONNECT-OK reply=%s\n", buf);
	close(fd);
	return 0;
}

static int vsock_listen(unsigned port) {
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, 1) != 0) {
		printf("VSOCK-LISTEN-FAIL %s\n", strerror(errno));
		return 1;
	}
	printf("VSOCK-LISTENING %u\n", port);
	int c = accept(fd, NULL, NULL);
	if (c < 0) {
		printf("VSOCK-LISTEN-FAIL accept %s\n", strerror(errno));
		return 1;
	}
	char line[128];
	size_t got = 0;
	while (got < sizeof(line) - 1) {
		ssize_t n = read(c, line + got, 1);
		if (n <= 0 || line[got] == '\n')
			break;
		got++;
	}
	line[got] = 0;
	char reply[160];
	int len = snprintf(reply, sizeof(reply), "echo:%s\n", line);
	if (write(c, reply, len) != len) {
		printf("VSOCK-LISTEN-FAIL write %s\n", strerror(errno));
		return 1;
	}
	printf("VSOCK-LISTEN-OK got=%s\n", line);
	close(c);
	close(fd);
	return 0;
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc >= 2 && strcmp(argv[1], "seccomp") == 0)
		return check_seccomp();
	if (argc >= 3 && strcmp(argv[1], "forks") == 0)
		return check_forks(atoi(argv[2]));
	if (argc >= 4 && strcmp(argv[1], "vsock-connect") == 0)
		return vsock_connect((unsigned)atoi(argv[2]), argv[3]);
	if (argc >= 3 && strcmp(argv[1], "vsock-listen") == 0)
		return vsock_listen((unsigned)atoi(argv[2]));
	fprintf(stderr, "usage: guest_checks seccomp | forks N | vsock-connect PORT MSG | vsock-listen PORT\n");
	return 2;
}
