#pragma clang section data="maps/hash"
int count(void *ctx)
{
    return 0;
}
