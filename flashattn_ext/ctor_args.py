"""Argument checks shared by the constructors that allocate buffers (PagedKVCache, DecodeWorkspace).

Each error names the constructor and the argument, and is raised before anything is allocated, so a wrong
dtype or device reads as a message about that argument instead of a torch error about ``zeros()`` or a
missing NVIDIA driver.
"""
import numbers

import torch


def check_count(value, owner, name, minimum=1, maximum=None):
    """value is an int (not a bool) in [minimum, maximum]; returns it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {name} must be <= {maximum}, got {value}")
    return int(value)


def check_dtype(dtype, owner, allowed):
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{owner}: dtype must be a torch.dtype such as torch.bfloat16, got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype not in allowed:
        raise TypeError(f"{owner}: dtype must be one of {[str(d) for d in allowed]}, got {dtype}")
    return dtype


def resolve_device(device, owner):
    """A torch.device for the buffers: ``device`` as given, or, when None, the current CUDA device if CUDA is
    usable and the CPU otherwise. A CUDA device on a machine without usable CUDA is refused here."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"{owner}: device must be None, a str, an int or a torch.device, got "
                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{owner}: device {device!r} is not a device name ({err})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{owner}: device must be cpu or cuda, got {dev}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{owner}: device={device!r} but CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); pass device='cpu' or leave device=None")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"{owner}: device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                             "exist")
        dev = torch.device("cuda", index)
    return dev
