// Map `exec_count` is declared by the spec; loaderd generates its definition.
int count_exec(void *ctx)
{
    u32 key = 0;
    u64 *value = exec_count.lookup(&key);
    if (value)
        __sync_fetch_and_add(value, 1);
    return 0;
}
