// Initialises libgcrypt before any shared library's constructor runs, without secure memory.
//
// Why: Debian's libavformat links libssh-gcrypt, whose ELF constructor initialises libgcrypt
// with a 16 KiB secure-memory pool (GCRYCTL_INIT_SECMEM), which mlock()s it. Where mlock is
// refused — a container runtime's seccomp filter (systemd-nspawn without CAP_IPC_LOCK answers
// EPERM), RLIMIT_MEMLOCK=0 for an unprivileged user — libgcrypt prints "Warning: using insecure
// memory!" on stderr, i.e. into the journal, once per worker start. The worker never uses ssh
// (or any cryptography); it holds no secrets worth locking. So it initialises libgcrypt itself,
// first, with secure memory disabled and initialisation finished: libssh's constructor then
// sees GCRYCTL_INITIALIZATION_FINISHED_P and leaves libgcrypt alone — no mlock, no warning.
//
// .preinit_array entries of the executable run after every shared object is loaded and
// relocated but before any of their constructors (the ELF gABI; glibc calls them from
// _dl_init). libgcrypt is found with dlsym, not linked: it is only present when FFmpeg's
// dependencies bring it, and the worker must not start to depend on it.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

#include "CWorkerPreinit.h"

// From gcrypt.h (a stable ABI since libgcrypt 1.2).
enum { CV_GCRYCTL_DISABLE_SECMEM = 37, CV_GCRYCTL_INITIALIZATION_FINISHED = 38,
       CV_GCRYCTL_ANY_INITIALIZATION_P = 40 };

static int gcrypt_state = 0;

static void cv_gcrypt_first(int argc, char **argv, char **envp) {
    (void)argc; (void)argv; (void)envp;
    const char *(*check_version)(const char *) = (const char *(*)(const char *))dlsym(RTLD_DEFAULT, "gcry_check_version");
    unsigned int (*control)(int, ...) = (unsigned int (*)(int, ...))dlsym(RTLD_DEFAULT, "gcry_control");
    if (check_version == NULL || control == NULL) return;
    if (control(CV_GCRYCTL_ANY_INITIALIZATION_P)) return;  // someone was first; leave it be
    // The libgcrypt manual's sequence for a program that needs no secure memory.
    if (check_version(NULL) == NULL) { gcrypt_state = -1; return; }
    control(CV_GCRYCTL_DISABLE_SECMEM, 0);
    control(CV_GCRYCTL_INITIALIZATION_FINISHED, 0);
    gcrypt_state = 1;
}

__attribute__((section(".preinit_array"), used))
static void (*const cv_preinit_gcrypt)(int, char **, char **) = cv_gcrypt_first;

int cv_gcrypt_preinit_state(void) { return gcrypt_state; }
