KERNEL_MODULES = ("sde_step", "token_entropy", "attention_entropy", "ovf")
