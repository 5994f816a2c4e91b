#include "local.h"
int count(void *ctx)
{
    return 0;
}
