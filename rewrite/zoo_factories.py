"""`--model` factories for the zoo: `rewrite compile --model rewrite.zoo_factories:bert`."""
from __future__ import annotations

from . import zoo


def _factory(name: str):
    def build():
        z = zoo.load(name)
        return z.model, z.example, z.calibration

    build.__name__ = name
    return build


for _name in zoo.ALL:
    globals()[_name] = _factory(_name)
