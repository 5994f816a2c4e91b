"""The resident daemon: `daemon` (sd_notify, watchdog, drift checks, reload, the counters file),
`eventpump`, `ringbuf` and `perfbuf` (ring and perf buffer events decoded, sanitized,
journaled; perf events handed over by the apply: bpf.handover), `records` (a layout's decode
and sanitize compiled once, the reference semantics per record). No bcc, no capabilities after
READY.

May import: observe and below (never stage: bcc must not load in the resident). Not apply, reports
or cli (the daemon runs the apply in a child process)."""
