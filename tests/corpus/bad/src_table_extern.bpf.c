BPF_TABLE("extern", u32, u64, ext, 16);
int count(void *ctx)
{
    return 0;
}
