"""Installable toolkit: ``pip install -e .`` makes ``lobes`` and ``tools`` importable.

The recipes under ``recipes/`` are run as scripts (SpeechBrain style) and import from here.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="adaltm-toolkit",
    version="0.1.0",
    description="SpeechBrain/ESPnet-style recipes for AdaLTM task-vector merging and HarmoniFuse",
    packages=find_packages(include=["lobes", "lobes.*", "tools", "tools.*"]),
    package_data={"tools": ["tiny_configs/*.json", "sentences.txt"]},
    python_requires=">=3.9",
    install_requires=requirements,
)
