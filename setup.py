"""Package discovery, the one part of the packaging that pyproject.toml cannot say: configs/ sits at the top of the
repository but installs as ``onestep.configs`` (package-dir in pyproject.toml), so its sub-folders are found under
that name. Namespace discovery makes every folder a
package, data-only ones included (onestep/assets/digits_t2i/unet, configs/accelerate), so their files ship as that
package's data instead of setuptools warning 'Package would be ignored'. A new sub-package needs no edit here."""

from setuptools import find_namespace_packages, setup

SKIP = ["*__pycache__*"]


def packages_in(folder: str, name: str) -> list[str]:
    return [name] + [f"{name}.{p}" for p in find_namespace_packages(folder, exclude=SKIP)]


setup(packages=packages_in("onestep", "onestep") + packages_in("configs", "onestep.configs"))
