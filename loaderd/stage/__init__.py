"""Staging one spec: `compile` (BCC, in a forked worker), `worker` (verify facts, load, pin in
staging, fill, freeze) and the worker pool. The only importer of bcc.

May import: config, bpf, store, audit and below. Not observe, apply, runtime, reports or cli."""
