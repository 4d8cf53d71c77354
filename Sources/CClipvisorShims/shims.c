#define _GNU_SOURCE
#include "CClipvisorShims.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int cv_memfd_create_sealable(const char *name) {
    return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
}

int cv_seal_block(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
}

int cv_seal_slab(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL);
}

int cv_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }

int cv_seals_forbid_shrinking(int seals) { return seals >= 0 && (seals & F_SEAL_SHRINK) != 0; }

int cv_seals_are_complete(int seals) {
    int need = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE;
    return seals >= 0 && (seals & need) == need;
}

int cv_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

pid_t cv_clone_sibling(void) {
    // Raw clone with no new stack: the child continues on a copy of this stack, as after fork().
    return (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, NULL, NULL, 0);
}

pid_t cv_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int cv_become_worker(int control) {
    if (control != 3) {
        if (dup2(control, 3) < 0) return -1;  // also closes the fork server's own socket
        close(control);
    } else if (fcntl(3, F_SETFD, 0) < 0) {
        return -1;
    }
    if (close_range(4, ~0U, 0) != 0) return -1;
    return setpgid(0, 0);
}

int cv_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

ssize_t cv_send_with_fd(int sock, const void *buf, size_t len, int fd, int flags) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {0};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    }
    return sendmsg(sock, &msg, flags | MSG_NOSIGNAL);
}

ssize_t cv_recv_with_fd(int sock, void *buf, size_t len, int *fd_out, int *truncated, int flags) {
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {0};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 8)];
        struct cmsghdr align;
    } control;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    *fd_out = -1;
    *truncated = 0;
    ssize_t n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int received;
            memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*fd_out < 0) {
                *fd_out = received;
            } else {
                close(received);
                *truncated = 1;
            }
        }
    }
    return n;
}

int cv_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t size = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &size) != 0) return -1;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int cv_set_parent_death_signal(int sig) { return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0); }

int cv_set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }

int cv_landlock_forbid_writes(void) {
    int abi = (int)syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 0) return -1;
    struct landlock_ruleset_attr attr = {0};
    attr.handled_access_fs = LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_REMOVE_DIR |
                             LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_CHAR |
                             LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG |
                             LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO |
                             LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM;
#ifdef LANDLOCK_ACCESS_FS_REFER
    if (abi >= 2) attr.handled_access_fs |= LANDLOCK_ACCESS_FS_REFER;
#endif
#ifdef LANDLOCK_ACCESS_FS_TRUNCATE
    if (abi >= 3) attr.handled_access_fs |= LANDLOCK_ACCESS_FS_TRUNCATE;
#endif
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
    if (ruleset < 0) return -1;
    // No rules are added: every handled access is denied everywhere.
    int rc = (int)syscall(SYS_landlock_restrict_self, ruleset, 0);
    int saved = errno;
    close(ruleset);
    errno = saved;
    return rc < 0 ? -1 : abi;
}

int cv_spawn_file_actions_addclosefrom(void *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, lowfd);
}

int cv_affinity_cpu_count(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    return CPU_COUNT(&set);
}

int cv_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int cv_epoll_ctl(int epfd, cv_epoll_op op, int fd, int interest, uint64_t token) {
    static const int ops[] = {EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL};
    if ((int)op < 0 || (int)op > 2) {
        errno = EINVAL;
        return -1;
    }
    uint32_t events = 0;
    if (!(interest & CV_INTEREST_NO_READ)) events |= EPOLLIN | EPOLLRDHUP;
    if (interest & CV_INTEREST_WRITE) events |= EPOLLOUT;
    struct epoll_event event = {.events = events, .data = {.u64 = token}};
    return epoll_ctl(epfd, ops[op], fd, &event);
}

int cv_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms) {
    struct epoll_event list[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, list, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        uint32_t e = list[i].events;
        uint32_t out = 0;
        if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) out |= CV_EVENT_READABLE;
        if (e & EPOLLOUT) out |= CV_EVENT_WRITABLE;
        if (e & (EPOLLHUP | EPOLLERR)) out |= CV_EVENT_CLOSED;
        tokens[i] = list[i].data.u64;
        events[i] = out;
    }
    return n;
}

int cv_unix_stream_socket(int nonblocking) {
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
}

/* A SEQPACKET datagram must fit the sender's buffer (EMSGSIZE otherwise), and the default
 * (net.core.wmem_default, ~208 KiB) is less than a job or an answer listing 10 000 frames.
 * The *FORCE options pass net.core.[rw]mem_max for a privileged supervisor; otherwise the
 * kernel caps the request at that maximum and doubles it (~416 KiB with default sysctls). */
static void cv_grow_buffers(int fd, int bytes) {
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

int cv_unix_seqpacket_pair(int *fds, int buffer_bytes) {
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) return -1;
    cv_grow_buffers(fds[0], buffer_bytes);
    cv_grow_buffers(fds[1], buffer_bytes);
    return 0;
}

int cv_send_buffer_bytes(int fd) {
    int value = 0;
    socklen_t len = sizeof value;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &value, &len) != 0) return -1;
    return value;
}

int cv_sock_stream(void) { return SOCK_STREAM; }

int cv_accept_nonblocking(int listener) {
    return accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
}

int cv_pipe_cloexec(int *fds) { return pipe2(fds, O_CLOEXEC); }

int cv_signalfd_for_lifecycle(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGQUIT);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

int cv_signalfd_read(int fd) {
    struct signalfd_siginfo info;
    ssize_t n = read(fd, &info, sizeof info);
    if (n != (ssize_t)sizeof info) return 0;
    return (int)info.ssi_signo;
}

int cv_spawnattr_reset_signals(void *attr) {
    posix_spawnattr_t *a = (posix_spawnattr_t *)attr;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    int rc = posix_spawnattr_setsigmask(a, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(a, &all);
    return rc;
}

const char *cv_signal_name(int sig) {
    const char *abbrev = sigabbrev_np(sig);
    return abbrev;
}

int cv_waitid_pidfd(int pidfd, int *code, int *status) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PIDFD, (id_t)pidfd, &info, WEXITED | WNOHANG) != 0) return -1;
    if (info.si_pid == 0) return 0;
    *code = info.si_code;
    *status = info.si_status;
    return 1;
}

int cv_cld_exited(void) { return CLD_EXITED; }

char **cv_environ(void) { return environ; }

int cv_unread_output_bytes(int fd) {
    int queued = 0;
    if (ioctl(fd, SIOCOUTQ, &queued) != 0) return -1;
    return queued;
}

int cv_terminal_size(int fd, int *rows, int *columns) {
    struct winsize size;
    if (ioctl(fd, TIOCGWINSZ, &size) != 0) return -1;
    *rows = size.ws_row;
    *columns = size.ws_col;
    return 0;
}
