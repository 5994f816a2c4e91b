/* spaced, behind a comment */
 /**/ #  line 7 "/etc/shadow"
int count(void *ctx) { return 0; }
