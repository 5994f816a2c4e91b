#include <linux/sched.h>
#include <uapi/linux/ptrace.h>
#include <net/sock.h>
#include <bcc/proto.h>
#include <asm/page.h>

/* Comments may mention BPF_TABLE_PINNED, extern, maps/ or a section: they are not code. */
// #include "not_really.h"
static const char *note = "a /* string */ with // slashes";

int count(void *ctx)
{
    u32 key = 0;
    u64 *value = counts.lookup(&key);
    if (value)
        __sync_fetch_and_add(value, 1);
    return 0;
}

int count_v2(void *ctx)
{
    return count(ctx);
}
