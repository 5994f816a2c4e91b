"""The kernel side: `kernel` (the one ctypes wrapper of bpf(), libbpf.so.1 and perf_event_open;
typed KernelError), `pins` (bpffs paths under one root, no symlink following), `attach` (bpf_link
per attach kind, and the probes that refuse a type the kernel cannot run), `cgroup` (cgroup2
mount, cgroup paths and systemd units as targets), `uprobe` (trusted ELF binaries, symbol file
offsets, their identity), `btf` (the running kernel's type info), `bytecode` (helper calls
decoded from instructions).

May import: model, errors. Nothing here knows about specs on disk or the manifest."""
