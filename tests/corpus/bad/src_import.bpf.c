#import <linux/sched.h>
int count(void *ctx)
{
    return 0;
}
