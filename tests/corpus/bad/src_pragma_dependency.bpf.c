int f(struct __sk_buff *skb) { return 0; }
  #  pragma	GCC dependency "/root/secret"
