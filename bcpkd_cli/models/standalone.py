"""Built-in networks without bcpkd: the source of a zoo network as one file that needs only torch (an export's
network.py), the call that builds it, and a checkpoint's weights in that network's own key names.

The network in network.py is the architecture alone: inputs are normalised by the caller (bcpkd's checkpoints
normalise inside their `features`; those layers hold no weights, so the key names differ only by position).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from bcpkd_cli.models import base

MLP_SOURCE = '''

def mlp(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """Linear and ReLU layers of the given widths, then the linear head."""
    layers, width = [], in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, num_classes))
'''


def _body(module) -> str:
    """A module's source without its `from __future__` and bcpkd imports (network.py has one of each kind)."""
    return "\n".join(line for line in inspect.getsource(module).splitlines()
                     if not line.startswith(("from __future__", "from bcpkd_cli")))


def network_source(make) -> str:
    """network.py: models/base.py and the family module of the zoo builder `make` (None: the mlp)."""
    header = '"""The network of a bcpkd export, as plain PyTorch (needs only torch)."""\n\nfrom __future__ import ' \
             'annotations\n'
    if make is None:
        return header + "\nfrom torch import nn\n" + MLP_SOURCE
    return header + "\n" + _body(base) + "\n\n" + _body(inspect.getmodule(make)) + "\n"


def network_call(spec: dict, make) -> str:
    """The Python expression that builds the bare network from network.py."""
    if make is None:
        return f"network.mlp({spec['input_shape'][0]}, {list(spec['hidden'])}, {spec['n_classes']})"
    return f"network.{make.__name__}({spec['n_classes']}, in_channels={spec['input_shape'][0]})"


def tensor_names(network: nn.Module) -> dict[int, str]:
    """id of each tensor of a network's state dict -> its key (taken before the network is wrapped)."""
    return {id(t): name for name, t in network.state_dict(keep_vars=True).items()}


def mapped_names(model: nn.Module, own: dict[int, str]) -> dict[str, str]:
    """bcpkd model key -> the key the same tensor has in the bare network (`tensor_names` of it)."""
    return {name: own[id(t)] for name, t in model.state_dict(keep_vars=True).items() if id(t) in own}


def linear_names(model: nn.Module, bare: nn.Module) -> dict[str, str]:
    """bcpkd model key -> bare key, pairing the two networks' Linear layers in order (the mlp)."""
    ours = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    theirs = [name for name, m in bare.named_modules() if isinstance(m, nn.Linear)]
    return {f"{a}.{p}": f"{b}.{p}" for a, b in zip(ours, theirs) for p in ("weight", "bias")}


def renamed(state_dict: dict[str, torch.Tensor], names: dict[str, str], arch: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the bare network's names; every one must have a counterpart."""
    missing = [k for k in state_dict if k not in names]
    if missing:
        from bcpkd_cli.errors import BcpkdError

        raise BcpkdError(f"{arch}: weights {', '.join(missing[:3])} have no counterpart in the bare network; export "
                         f"with --format onnx,pt2")
    return {names[k]: v for k, v in state_dict.items()}
