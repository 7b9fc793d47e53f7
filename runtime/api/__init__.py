"""The vocabulary every runtime layer shares: request/result types, serving limits, observer
hooks, and `EngineClient`, the Protocol every door is typed against. Imports nothing above it."""
