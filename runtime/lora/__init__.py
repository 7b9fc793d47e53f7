"""Mixed-adapter LoRA: the per-row kernels and strategies (torch and Triton), the LoRA layers
injected into the base, the device-slot pool and host loading."""
