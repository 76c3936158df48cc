"""Released training checkpoints, read without running their pickled code.

A training script's checkpoint often pickles, beside the weights, objects of its training
stack: DeepSpeed's loss scaler and ZeRO records (`deepspeed.*`), a learning-rate schedule
(torch 2.1's `OneCycleLR` state holds its annealing function, pickled as
`getattr(torch.optim.lr_scheduler.OneCycleLR, ...)`), logged numpy scalars. Reading the
weights needs none of them, and importing their packages would run their code. So the file's
pickle is first disassembled (nothing unpickled) to list its globals; those from INERT_MODULES
become `Inert` stand-ins, those of ALIASES harmless equivalents and the training scripts' config
classes of RECORDS plain `Record`s of their attributes, all through torch's weights-only
unpickler (`torch.serialization.safe_globals`), and a file holding any other global that torch
does not allow is refused before anything is unpickled.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data.files import load_tensors

INERT_MODULES = ("deepspeed.", "torch.optim.", "numpy.")  # training objects whose contents are never needed


class Inert:
    """Stands for an object of INERT_MODULES: takes any construction and state, keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class Record(Inert):
    """A pickled config object of RECORDS: its attributes, and nothing of its class's code."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (instance dict, slots dict)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


# The config classes that MinD-Vis' and DC-MAE's training scripts pickle into their checkpoints: those of
# their `code/config.py` (imported as the module `config`), and the transformers ViT-MAE config DC-MAE's
# phase 2 keeps in its `config_merge`.
RECORDS = frozenset((*(f"config.{name}" for name in (
    "Config_MAE_fMRI", "Config_MBM_fMRI", "Config_MBM_finetune", "Config_Generative_Model", "Config_MBM_fMRI_contrast",
    "Config_MBM_finetune_cross", "Config_MBM_finetune_contrast")), "transformers.models.vit_mae.configuration_vit_mae.ViTMAEConfig"))


def _inert_attribute(obj, name, *default) -> Inert:
    """`getattr` as unpickled: an attribute of a stand-in is a stand-in; no lookup is made."""
    return Inert()


def _plain_dict(*args) -> dict:
    """`collections.defaultdict(factory)` as unpickled: a plain dict (the factory is never called)."""
    return {}


ALIASES = {"builtins.getattr": _inert_attribute, "collections.defaultdict": _plain_dict, "builtins.dict": dict}


def load_released(path: Path, error: type[Exception], what: str):
    """The object pickled in a torch file, its training objects replaced as the module docstring says.
    A global outside them raises `error` naming the file and the global; a file that cannot be
    read raises `error` as "<path>: <what> (<reason>)"."""
    path = Path(path)
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip-format torch file: only plain weights are read from it
        return load_tensors(path, error, what)
    if not names:
        return load_tensors(path, error, what)
    refused = [n for n in names if n not in ALIASES and n not in RECORDS and not n.startswith(INERT_MODULES)]
    if refused:
        raise error(f"{path}: holds {refused[0]}, which is not a tensor, a known training object or a known "
                    "config; refusing to unpickle it")
    stand_ins = [(Record if n in RECORDS else ALIASES.get(n, Inert), n) for n in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise error(f"{path}: {what} ({type(e).__name__})") from None
