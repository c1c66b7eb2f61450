"""Package layout only (metadata lives in pyproject.toml).

The config tree stays at the repository's top level (``configs/``: Hydra, ``flwr run``'s
FAB and the docs all point there) and is installed as ``fed_iotlm/configs`` in a wheel,
where :func:`fed_iotlm.settings.config_dir` finds it.  pyproject.toml alone cannot map
a directory outside the packages that ``packages.find`` discovers, hence this file."""

from setuptools import find_namespace_packages, find_packages, setup

CODE = find_packages(include=["fed_iotlm*", "clients*", "server*", "simulations*"])
CONFIGS = ["fed_iotlm.configs"] + [
    f"fed_iotlm.configs.{p}" for p in find_namespace_packages("configs")
]

setup(
    packages=CODE + CONFIGS,
    package_dir={"fed_iotlm.configs": "configs"},
    package_data={"": ["*.yaml"]},
)
