"""Networks from outside the zoo, by name: `torchvision:<name>`, `timm:<name>` (the optional timm extra), and the
user's own factory, `<module>:<callable>` or `<path/to/file.py>:<callable>`, called as
`callable(num_classes=C, **arch_kwargs)`.

Every such network gets the split that last-layer Laplace, MC dropout and the gradient statistics need
without the user writing anything: its last `nn.Linear` (torchvision's `fc`, `classifier[-1]`,
`heads.head`, ...) becomes `head`, and the network with that layer replaced by an identity becomes
`features`. The split is checked on an example input: head(features(x)) must equal the network's own
output, so a head that is not the last operation is refused.

User code is imported only where the user names it: an architecture that names a module or file is
built when the user's own recipe or flags name it (`trust`), or with `--trust-code`; a checkpoint
that names one is refused otherwise, before anything is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bcpkd_cli.errors import BcpkdError

LIBRARIES = ("torchvision", "timm")
_trusted: set[str] = set()  # user-code architectures this process may import (named by the user, or all)
_trust_all = False


def is_user_code(arch: str) -> bool:
    return ":" in arch and arch.split(":", 1)[0] not in LIBRARIES


def trust(arches: list[str] | None = None, everything: bool = False) -> None:
    """Allow these user-code architectures (the user named them), or every one (--trust-code)."""
    global _trust_all
    _trusted.update(a for a in arches or [] if is_user_code(a))
    _trust_all = _trust_all or everything


def reset_trust() -> None:
    """Trust nothing (the start of every command)."""
    global _trust_all
    _trusted.clear()
    _trust_all = False


def trusted() -> tuple[list[str], bool]:
    """What this process trusts (handed to worker processes)."""
    return sorted(_trusted), _trust_all


def _import_user(source: str, arch: str):
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise BcpkdError(f"{arch}: no such file {path}; give the factory as path/to/file.py:callable")
        name = f"bcpkd_user_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        raise BcpkdError(f"{arch}: cannot import module {err.name!r}; put the folder that holds it on PYTHONPATH "
                         f"(e.g. PYTHONPATH=$PWD bcpkd ...) or name the file: path/to/{source.replace('.', '/')}.py:"
                         f"{arch.split(':', 1)[1]}") from None


def factory(arch: str) -> Callable[..., nn.Module]:
    """The builder an architecture string names; called as builder(num_classes=C, **arch_kwargs)."""
    source, _, name = arch.partition(":")
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model_builder(name)
        except ValueError:
            raise BcpkdError(f"{arch}: torchvision has no model {name!r} (e.g. resnet18, mobilenet_v3_small, "
                             f"efficientnet_b0, vit_b_16; see torchvision.models.list_models())") from None
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise BcpkdError(f"{arch}: timm models need the timm extra: pip install -e '.[timm]'") from None
        if not timm.is_model(name):
            raise BcpkdError(f"{arch}: timm has no model {name!r} (see timm.list_models())")
        return lambda **kwargs: timm.create_model(name, **kwargs)
    if not (_trust_all or arch in _trusted):
        raise BcpkdError(f"{arch}: the network is built by user code ({source}), which bcpkd does not run on its "
                         f"own; pass --trust-code if you trust it")
    builder = getattr(_import_user(source, arch), name, None)
    if not callable(builder):
        raise BcpkdError(f"{arch}: {source} has no callable {name!r}")
    return builder


def build_foreign(arch: str, n_classes: int, arch_kwargs: dict) -> nn.Module:
    """The network an architecture string names, for n_classes classes."""
    try:
        net = factory(arch)(num_classes=n_classes, **arch_kwargs)
    except TypeError as err:
        raise BcpkdError(f"{arch}: could not be called as (num_classes={n_classes}, **arch_kwargs "
                         f"{arch_kwargs}): {err}") from None
    if not isinstance(net, nn.Module):
        raise BcpkdError(f"{arch}: returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def split_head(net: nn.Module, example: torch.Tensor, arch: str) -> tuple[nn.Module, nn.Linear]:
    """(features, head): the network's last nn.Linear and the network with it replaced by an identity, checked
    on `example` [B, ...] to give head(features(x)) == net(x)."""
    linears = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise BcpkdError(f"{arch}: has no nn.Linear layer; bcpkd needs a network whose last operation is a linear "
                         f"head (features -> logits)")
    name, head = linears[-1]
    parent_name, _, leaf = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits = net(example)
            setattr(parent, leaf, nn.Identity())
            features = net(example)
            same = features.ndim == 2 and features.shape[1] == head.in_features and \
                torch.allclose(head(features), logits, rtol=1e-4, atol=1e-5)
    except Exception as err:  # the model's own error on this input shape, reported as such
        raise BcpkdError(f"{arch}: failed on inputs of shape {tuple(example.shape[1:])} ({str(err)[:150]}); "
                         f"models with a fixed input size need --set data.image_size=S") from None
    if not same:
        setattr(parent, leaf, head)
        raise BcpkdError(f"{arch}: its last nn.Linear ({name}) is not the network's last operation (the output is "
                         f"not that layer's output); bcpkd needs features -> linear head -> logits")
    net.train(was_training)
    return net, head
