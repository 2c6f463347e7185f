"""The registry of self-supervised methods."""

from __future__ import annotations

from models.methods.barlowtwins import BarlowTwins
from models.methods.base import Method, Progress
from models.methods.byol import BYOL
from models.methods.colorization import Colorization
from models.methods.decoupling import Decoupling
from models.methods.dino import DINO
from models.methods.inpainting import ContextEncoder
from models.methods.ipt import IPT
from models.methods.jigsaw import JigsawMethod
from models.methods.mae import MAE
from models.methods.mocov1 import MoCoV1
from models.methods.mocov2 import MoCoV2
from models.methods.mocov3 import MoCoV3
from models.methods.multitask import MultiTask
from models.methods.npid import NPID
from models.methods.relloc import RelativeLocationMethod
from models.methods.rotnet import RotNet
from models.methods.simclr import SimCLR
from models.methods.sim import SIM
from models.methods.simsiam import SimSiam
from models.methods.swav import SwAV
from models.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SwAV, DINO, MoCoV1, MoCoV2, MoCoV3, SimCLR, BYOL, SimSiam, BarlowTwins, VICReg, MAE, SIM,
                              NPID, RotNet, Decoupling, JigsawMethod, RelativeLocationMethod, MultiTask, Colorization,
                              ContextEncoder, IPT)
}


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def create_method(name: str, **kwargs) -> Method:
    return method_class(name)(**kwargs)


__all__ = ["METHODS", "Method", "Progress", "create_method", "method_class"]
