"""Read-only views of what is applied: `drift` (manifest x kernel: what differs), `status`
(the report both CLIs print), `dump` (map entries, typed and sanitized). Opens nothing for
writing, needs no capability.

May import: config, bpf, store, audit and below. Not stage (no bcc), apply, runtime, reports
or cli."""
