// clipvisor-worker: thin entry point; the commands live in Worker/Commands.swift.
WorkerCommand.main()
