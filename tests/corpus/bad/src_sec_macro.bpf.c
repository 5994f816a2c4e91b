int t SEC("maps/x");
int count(void *ctx)
{
    return 0;
}
