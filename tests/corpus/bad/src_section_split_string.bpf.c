int t __attribute__((__section__("ma" "ps/hash")));
int count(void *ctx)
{
    return 0;
}
