"""Which packages the distribution holds (the rest of the metadata is in pyproject.toml).

The SDK, the CLI and the simulator live in the folders sdk/, cli/ and sim/ but install as
meshd_sdk, meshd_cli and meshd_sim: generic top-level names (`sdk`, `cli`, `sim`) in
site-packages would collide with other distributions.
"""

from setuptools import find_packages, setup

RENAMED = {"meshd_sdk": "sdk", "meshd_cli": "cli", "meshd_sim": "sim"}

setup(
    packages=[*find_packages(include=["meshd", "meshd.*"]), *RENAMED],
    package_dir=RENAMED,
)
