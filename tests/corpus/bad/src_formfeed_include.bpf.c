int a;
#include "/etc/shadow"
int count(void *ctx)
{
    return 0;
}
