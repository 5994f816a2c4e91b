int count(void *ctx)
{
    return 0;
}
