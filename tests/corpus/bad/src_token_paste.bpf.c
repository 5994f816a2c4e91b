#define CAT(a, b) a##b
int count(void *ctx)
{
    return 0;
}
