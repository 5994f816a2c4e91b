int count(void *ctx)
{ /* café */
    return 0;
}
