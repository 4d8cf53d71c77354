#ifndef CLIPVISOR_CSYSTEMD_SHIM_H
#define CLIPVISOR_CSYSTEMD_SHIM_H
// libsystemd for the supervisor's service glue (Sources/Supervisor/Systemd). What is used imports
// as it is, so there are no wrappers here:
//   sd_notify(3)            READY=1, STATUS=, WATCHDOG=1, STOPPING=1, MAINPID= (no-op without NOTIFY_SOCKET)
//   sd_watchdog_enabled(3)  WATCHDOG_USEC, honouring WATCHDOG_PID
//   sd_is_socket_unix(3)    checks the listening socket passed with LISTEN_FDS
//   sd_journal_sendv(3)     structured journal entries from FIELD=value iovecs; it returns success
//                           and drops the entry when /run/systemd/journal/socket does not exist,
//                           so callers check for the socket first
// The variadic forms (sd_notifyf, sd_journal_send, sd_journal_print) do not import and are not used.
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>
#endif
