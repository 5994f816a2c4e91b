BPF_TABLE_PUBLIC("hash", u32, u64, public, 16);
int count(void *ctx)
{
    return 0;
}
