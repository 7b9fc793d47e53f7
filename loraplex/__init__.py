"""loraplex: a LoRA adapter registry and a runtime that serves many adapters on one base.

The thin shared core lives here (errors, base fingerprints, the embedded base model, the
CLI entry point). `loraplex.registry`, `loraplex.runtime` and `loraplex.trainer` are
installed from the top-level `registry/`, `runtime/` and `trainer/` folders.
"""

__version__ = "0.1.0"
