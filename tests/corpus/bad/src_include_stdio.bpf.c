#include <stdio.h>
int count(void *ctx)
{
    return 0;
}
