"""The resident daemon: `daemon` (sd_notify, watchdog, drift checks, reload), `eventpump` and
`ringbuf` (ring buffer events decoded, sanitized, journaled). No bcc, no capabilities after READY.

May import: observe and below (never stage: bcc must not load in the resident). Not apply, reports
or cli (the daemon runs the apply in a child process)."""
