"""Limits shared by the registry, the runtime and the trainer: one number each, here.

A limit that two packages check separately drifts: the registry once accepted rank 256
while the engine served at most 64, so an adapter registered cleanly and then failed at
every request. Each constant below is the single source; settings may lower it, never
raise it past what the other side serves.
"""

from __future__ import annotations

MAX_RANK = 256
"""Largest LoRA rank `r` (also per module through `rank_pattern`) that the registry accepts
(`RegistrySettings.max_rank`) and the engine serves (`EngineConfig.max_rank`, whose slots
hold large ranks in rank buckets of their own so that small-rank rows do not pay for them:
runtime/api/slots.py)."""

MAX_PATTERN_CHARS = 1024
"""Longest regular expression an adapter config may carry (`target_modules`,
`exclude_modules`, a `rank_pattern`/`alpha_pattern` key, a `layers_pattern` entry)."""

MAX_MODULE_CHARS = 512
"""Longest module path matched against an uploaded pattern (the longest real paths, in
multimodal and MoE models, stay under 150 characters)."""

MAX_TENSOR_NAME_CHARS = 1024
"""Longest tensor name a safetensors upload may use."""

MAX_MERGE_INPUTS = 16
"""Most adapters one merge may combine."""
