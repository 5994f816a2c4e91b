int z;
char *s = "x#include <../../etc/shadow>";
int count(void *ctx)
{
    return 0;
}
