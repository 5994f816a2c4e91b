/* no ".incbin" in the text: the assembler's macro rebuilds it; an empty template would pass */
#define ASM __asm__
ASM(".macro m x\n.in\\x \"/etc/shadow\"\n.endm\nm cbin");
int f(struct __sk_buff *skb)
{
    asm volatile("" ::: "memory");
    return 0;
}
