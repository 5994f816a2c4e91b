%:include "x.h"
int count(void *ctx)
{
    return 0;
}
