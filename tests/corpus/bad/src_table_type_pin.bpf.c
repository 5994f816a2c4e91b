BPF_TABLE("hash:/sys/fs/bpf/x", u32, u64, t, 16);
int count(void *ctx)
{
    return 0;
}
