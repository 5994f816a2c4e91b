/* reads a root-only file into BTF line info */
#line 1 "/etc/shadow"
int count(void *ctx) { return 0; }
