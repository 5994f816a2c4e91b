BPF_XSKMAP(xsks, 4, "/sys/fs/bpf/xsks");
int count(void *ctx)
{
    return 0;
}
