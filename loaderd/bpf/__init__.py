"""The kernel side: `kernel` (the one ctypes wrapper of bpf(), libbpf.so.1 and perf_event_open;
typed KernelError), `pins` (bpffs paths under one root, no symlink following), `attach` (bpf_link
per attach kind), `btf` (the running kernel's type info), `bytecode` (helper calls decoded from
instructions).

May import: model, errors. Nothing here knows about specs on disk or the manifest."""
