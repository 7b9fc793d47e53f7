"""The only code that runs model forwards: base loading, the runner, attention masks and the
padded static (CUDA-graph) decode."""
