#include <linux/../../../etc/shadow>
int count(void *ctx)
{
    return 0;
}
