extern int other_table;
int count(void *ctx)
{
    return 0;
}
