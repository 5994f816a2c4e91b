BPF_QUEUESTACK_PINNED("queue", q, u32, 16, 0, "/sys/fs/bpf/q");
int count(void *ctx)
{
    return 0;
}
