"""Package discovery for setuptools (everything else is in pyproject.toml).

Every package under lidcseg/ is found, so a new subpackage is never left out of a
wheel; cli/ is installed as ``lidcseg_cli`` (a top-level ``cli`` would clash in
site-packages), which pyproject's ``packages.find`` cannot express.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["lidcseg", "lidcseg.*"]), "lidcseg_cli"])
