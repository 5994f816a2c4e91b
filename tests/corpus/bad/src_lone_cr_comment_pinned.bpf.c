// harmless commentBPF_TABLE_PINNED("hash", u32, u64, p, 1, "/sys/fs/bpf/p");
int count(void *ctx)
{
    return 0;
}
