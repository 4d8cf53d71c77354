#ifndef CWORKERPREINIT_H
#define CWORKERPREINIT_H

/// What the worker's pre-initialisation did with libgcrypt (see preinit.c): 1 it initialised
/// libgcrypt itself, without secure memory; 0 libgcrypt is not loaded in this process (an FFmpeg
/// built without libssh); -1 libgcrypt was loaded but refused (gcry_check_version failed).
/// Must be C: it runs from the executable's .preinit_array, before any library's constructor.
int cv_gcrypt_preinit_state(void);

#endif
