BPF_F_TABLE("hash", u32, u64, t, 16, 0);
int count(void *ctx)
{
    return 0;
}
