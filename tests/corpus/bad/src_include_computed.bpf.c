#define HDR <linux/sched.h>
#include HDR
int count(void *ctx)
{
    return 0;
}
