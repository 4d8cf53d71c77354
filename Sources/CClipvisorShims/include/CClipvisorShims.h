#ifndef CLIPVISOR_SHIMS_H
#define CLIPVISOR_SHIMS_H
// Linux primitives that Swift's Glibc module does not expose: it is built without _GNU_SOURCE,
// `syscall()` is variadic, and the CMSG_* macros do not import. Each function is a thin,
// errno-preserving wrapper: it returns what the syscall returns and leaves errno set.

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#pragma clang assume_nonnull begin

/// memfd_create(2) with MFD_CLOEXEC | MFD_ALLOW_SEALING: the block's home (hidden by _GNU_SOURCE).
int cv_memfd_create_sealable(const char *name);

/// Seals a finished block against shrinking, growing, writing and further sealing
/// (F_ADD_SEALS is hidden by _GNU_SOURCE). Fails with EBUSY while a writable shared mapping exists.
int cv_seal_block(int fd);
/// Seals a block slab against shrinking (a reader's mapping can never SIGBUS) and further
/// sealing (nobody can stop its reuse); it stays writable and growable.
int cv_seal_slab(int fd);

/// F_GET_SEALS: returns the seal bits, so a reader can refuse an unsealed (still mutable) block.
int cv_get_seals(int fd);

/// 1 when `seals` (from cv_get_seals) hold the shrink seal.
int cv_seals_forbid_shrinking(int seals);

/// 1 when `seals` (from cv_get_seals) hold shrink, grow and write seals.
int cv_seals_are_complete(int seals);

/// pidfd_open(2): there is no libc wrapper on glibc 2.36.
int cv_pidfd_open(pid_t pid);

/// The fork server's clone: a copy of the calling (single-threaded) process whose parent is the
/// caller's parent (CLONE_PARENT), so the supervisor reaps and signals the new worker through a
/// pidfd as if it had spawned it. Returns the child's pid in the caller, 0 in the child, -1 with
/// errno on failure. glibc >= 2.34 asks the kernel for the thread id in raise(), so abort() in
/// the child signals the child even though glibc's own fork bookkeeping did not run.
pid_t cv_clone_sibling(void);

/// The calling thread's id (gettid(2), which the Swift Glibc module does not import).
pid_t cv_gettid(void);

/// In a freshly cloned worker: `control` becomes fd 3, every other fd above 2 is closed, and the
/// process leads a new process group (the supervisor kills workers by group). 0 or -1 with errno.
int cv_become_worker(int control);

/// pidfd_send_signal(2): signals exactly the process we spawned, never a recycled pid.
int cv_pidfd_send_signal(int pidfd, int sig);

/// sendmsg(2) of `len` bytes with at most one fd as SCM_RIGHTS (pass -1 for none).
/// The CMSG_* macros cannot be used from Swift. MSG_NOSIGNAL keeps a dead peer from raising SIGPIPE.
ssize_t cv_send_with_fd(int sock, const void *buf, size_t len, int fd, int flags);

/// recvmsg(2) into `buf`; a received fd (MSG_CMSG_CLOEXEC) goes to `*fd_out`, else -1.
/// Extra fds beyond the first are closed so that a hostile peer cannot leak fds into us;
/// `*truncated` is set when the kernel reports MSG_CTRUNC or MSG_TRUNC.
ssize_t cv_recv_with_fd(int sock, void *buf, size_t len, int *fd_out, int *truncated, int flags);

/// SO_PEERCRED: struct ucred is hidden by _GNU_SOURCE.
int cv_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid);

/// prctl(PR_SET_PDEATHSIG): a worker dies with its supervisor (prctl is variadic).
int cv_set_parent_death_signal(int sig);

/// prctl(PR_SET_NO_NEW_PRIVS, 1): required before Landlock, and no setuid escalation from a codec bug.
int cv_set_no_new_privs(void);

/// Landlock: forbids creating, writing, truncating, removing or renaming any file system object
/// for this process and its children. Already-open fds (the block's memfd) still work.
/// Returns the Landlock ABI version used (> 0), or -1 with errno (ENOSYS/EOPNOTSUPP: unavailable).
int cv_landlock_forbid_writes(void);

/// posix_spawn_file_actions_addclosefrom_np: closes every fd >= `lowfd` in the child, so a worker
/// never inherits another client's connection (hidden by _GNU_SOURCE).
int cv_spawn_file_actions_addclosefrom(void *actions, int lowfd);

/// The number of CPUs in this process's affinity mask (CPU_COUNT is a macro).
int cv_affinity_cpu_count(void);

/// Readiness bits reported by cv_epoll_wait (sys/epoll.h is not in Swift's Glibc module).
enum {
    CV_EVENT_READABLE = 1,  // EPOLLIN, or a hang-up/error that a read will report
    CV_EVENT_WRITABLE = 2,  // EPOLLOUT
    CV_EVENT_CLOSED = 4,    // EPOLLHUP or EPOLLERR
};

/// epoll_create1(EPOLL_CLOEXEC).
int cv_epoll_create(void);

/// What cv_epoll_ctl watches: input unless CV_INTEREST_NO_READ, output with CV_INTEREST_WRITE.
enum {
    CV_INTEREST_WRITE = 1,
    CV_INTEREST_NO_READ = 2,
};

/// The epoll_ctl(2) operations, named (EPOLL_CTL_* live in sys/epoll.h, which Swift's Glibc
/// module does not include).
typedef enum {
    CV_EPOLL_ADD = 0,
    CV_EPOLL_MODIFY = 1,
    CV_EPOLL_REMOVE = 2,
} cv_epoll_op;

/// epoll_ctl(2) with `op`, watching what `interest` says, with a 64-bit token as the event's
/// data. Hang-ups and errors are always reported.
int cv_epoll_ctl(int epfd, cv_epoll_op op, int fd, int interest, uint64_t token);

/// epoll_wait(2) returning tokens and CV_EVENT_* bits as parallel arrays; struct epoll_event
/// is packed on x86_64 and its data union does not import cleanly.
int cv_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms);

/// socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC [| SOCK_NONBLOCK]). The SOCK_* constants belong
/// to whichever Clang module first includes <sys/socket.h> (here libsystemd's header), so Swift
/// files cannot rely on seeing them; these wrappers keep socket set-up in one place.
int cv_unix_stream_socket(int nonblocking);

/// socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC): the worker control channel.
/// A SOCK_SEQPACKET pair whose send and receive buffers are grown towards `buffer_bytes`.
int cv_unix_seqpacket_pair(int *fds, int buffer_bytes);
/// Bytes sent on a Unix stream socket that the peer has not read yet (SIOCOUTQ; counted with
/// the kernel's per-buffer overhead, so an over-estimate), or -1.
int cv_unread_output_bytes(int fd);
/// SO_SNDBUF of `fd` (the largest datagram is this minus a small overhead), or -1.
int cv_send_buffer_bytes(int fd);

/// SOCK_STREAM's value, for sd_is_socket_unix.
int cv_sock_stream(void);

/// accept4(2) with SOCK_CLOEXEC | SOCK_NONBLOCK (accept4 is hidden by _GNU_SOURCE).
int cv_accept_nonblocking(int listener);

/// pipe2(2) with O_CLOEXEC (hidden by _GNU_SOURCE).
int cv_pipe_cloexec(int *fds);

/// signalfd(4) for SIGTERM/SIGINT/SIGHUP/SIGQUIT (sys/signalfd.h is not in the Glibc module):
/// blocks those signals in the calling thread and returns a CLOEXEC|NONBLOCK fd.
int cv_signalfd_for_lifecycle(void);

/// Reads one signal number from the fd made by cv_signalfd_for_lifecycle; 0 when none is pending.
int cv_signalfd_read(int fd);

/// Unblocks every signal and resets dispositions for a child about to exec (posix_spawn helper).
int cv_spawnattr_reset_signals(void *attr);

/// strsignal-like short name ("SIGSEGV"); sigabbrev_np is hidden by _GNU_SOURCE.
const char *_Nullable cv_signal_name(int sig);

/// waitid(P_PIDFD, WEXITED|WNOHANG): reaps the child behind `pidfd` if it has exited.
/// Returns 1 when reaped (`*code` is CLD_EXITED/CLD_KILLED/CLD_DUMPED and `*status` the exit
/// code or signal), 0 when it is still running, -1 with errno on error. siginfo_t's union does
/// not import usefully into Swift.
int cv_waitid_pidfd(int pidfd, int *code, int *status);

/// CLD_EXITED, so Swift can tell an exit from a death by signal without the macro.
int cv_cld_exited(void);

/// The process environment (`environ` is declared only under _GNU_SOURCE), for posix_spawn.
char *_Nullable *_Nonnull cv_environ(void);

/// ioctl(TIOCGWINSZ): the terminal's rows and columns (`clipvisor top`); ioctl is variadic and
/// does not import into Swift. Returns 0, or -1 with errno when `fd` is not a terminal.
int cv_terminal_size(int fd, int *rows, int *columns);

#pragma clang assume_nonnull end
#endif
