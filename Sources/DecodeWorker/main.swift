// clipvisor-worker: thin entry point; the commands live in Worker/Commands.swift.
import CWorkerPreinit

// Referenced so that the linker keeps CWorkerPreinit, whose .preinit_array entry has already
// run by now (libgcrypt initialised without secure memory: no "insecure memory" warning).
_ = cv_gcrypt_preinit_state()
WorkerCommand.main()
