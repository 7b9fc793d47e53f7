"""loraplex benchmarks, run from the repository root with the editable install that
`make venv` sets up (see bench/README.md, "How to run"):

    make bench                                   # bench.lora_ops --quick
    make bench BENCH=serve ARGS="--duration 40"  # any bench.<name> with its flags
    .venv/bin/python -m bench.lora_ops --json    # the same, by hand

Why editable: `python -m bench.X` puts the repository root first on `sys.path`, so
`import loraplex` finds the checkout's own `loraplex/` folder, which holds only the core;
`registry/`, `runtime/` and `trainer/` become `loraplex.registry` & co. only through an
install's mapping. An editable install maps them onto this very checkout (what is measured
is the code you are reading); a regular install would be hidden behind the folder. The
check below says so in one line instead of a `No module named 'loraplex.runtime'` deep
inside a benchmark.
"""

import importlib.util

if importlib.util.find_spec("loraplex.runtime") is None:
    raise SystemExit(
        "bench: `loraplex.runtime` cannot be imported here: the checkout's loraplex/ folder "
        "hides a regular (non-editable) install. Run the benchmarks with the editable "
        "install: `make venv` (or `pip install -e .`), then `make bench` or "
        "`.venv/bin/python -m bench.<name>` from the repository root.")
