const char *where = "maps/hash";
int count(void *ctx)
{
    return 0;
}
