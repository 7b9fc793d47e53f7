"""The serving runtime: ONE base model, every tenant's adapters mixed in each forward.
One folder per concern (DEVELOPERS.md, "The runtime, folder by folder"); imports point down:
cli → fleet → serve → engine → model → {lora, kv, decoding} → api (`.importlinter`)."""
