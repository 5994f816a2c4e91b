// SPDX-License-Identifier: GPL-2.0
// CO-RE example for loaderd: on every exec, record the process's tgid, its parent's tgid and
// its comm, read through task_struct. Built against a vmlinux.h generated from the running
// kernel's BTF (build.sh); libbpf relocates every field offset against the BTF of whichever
// kernel loads it, so the reads are right on any kernel, with no headers installed.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct exec_info {
	__u32 tgid;
	__u32 ppid;
	char comm[16];
};

// Declared in the spec too (loaderd checks name, type, sizes, entries and flags against it).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct exec_info);
	__uint(max_entries, 4096);
} execs SEC(".maps");

SEC("tracepoint/sched/sched_process_exec")
int record_exec(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct exec_info info = {};
	__u32 key = bpf_get_current_pid_tgid() >> 32;

	info.tgid = BPF_CORE_READ(task, tgid);
	info.ppid = BPF_CORE_READ(task, real_parent, tgid);
	BPF_CORE_READ_STR_INTO(&info.comm, task, comm);
	bpf_map_update_elem(&execs, &key, &info, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
