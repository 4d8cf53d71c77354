#ifndef CLIPVISOR_CSYSTEMD_SHIM_H
#define CLIPVISOR_CSYSTEMD_SHIM_H
// sd_notify and sd_journal_sendv import as they are; the variadic forms do not and are not used.
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>
#endif
