"""Package discovery for the folder → import-name mapping (everything else is in pyproject).

`registry/`, `runtime/` and `trainer/` sit at the top of the checkout but install as
`loraplex.registry`, `loraplex.runtime` and `loraplex.trainer` (those bare names belong to
unrelated PyPI projects). `[tool.setuptools.packages.find]` can only name packages after
their folders, so it cannot produce `loraplex.runtime.serve.servicers` from `runtime/serve/servicers/`;
this file discovers every package under each mapped folder instead, so a new subpackage is
installed without anyone having to list it (a hand-written list silently leaves out a
package it forgets). `tests/core/test_wheel.py` builds the wheel,
installs it outside the checkout and serves from it.
"""

from setuptools import find_packages, setup

# import name -> folder in the checkout
PACKAGE_DIRS = {
    "loraplex": "loraplex",
    "loraplex.registry": "registry",
    "loraplex.runtime": "runtime",
    "loraplex.trainer": "trainer",
}


def discover() -> list[str]:
    """Every package (folder with `__init__.py`) under each mapped folder, by import name."""
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(packages)


setup(package_dir=PACKAGE_DIRS, packages=discover())
