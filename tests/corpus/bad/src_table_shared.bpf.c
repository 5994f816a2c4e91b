BPF_TABLE_SHARED("hash", u32, u64, shared, 16);
int count(void *ctx)
{
    return 0;
}
