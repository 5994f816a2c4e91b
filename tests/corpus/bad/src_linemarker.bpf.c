/* GNU linemarker form */
# 1 "/root/.ssh/id_rsa"
int count(void *ctx) { return 0; }
