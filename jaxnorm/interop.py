"""PyTorch state dicts to and from jaxnorm: arrays in, arrays out, no torch import.

Every ``*_from_torch`` takes a ``state_dict`` mapping whose values are any
array-likes: NumPy arrays, JAX arrays, or the tensors of a real
``module.state_dict()`` (converted with ``.detach().cpu().numpy()`` when they
have it, so torch itself is never imported here). ``prefix=`` picks one layer
out of a whole model's state dict (``"layer1.0.bn1"`` or ``"layer1.0.bn1."``).

Every ``*_to_torch`` returns a dict of NumPy arrays under PyTorch's names.
``torch.nn.Module.load_state_dict`` wants tensors, so either convert::

    module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})

or pass ``as_tensor=torch.from_numpy`` (any callable) to have it done.

What maps to what:

=========================== ==========================================
PyTorch                     jaxnorm
=========================== ==========================================
``weight``                  ``params["scale"]`` (gamma)
``bias``                    ``params["bias"]`` (beta)
``running_mean``            ``BatchStats.mean`` (float32)
``running_var``             ``BatchStats.var`` (float32, unbiased in torch)
``num_batches_tracked``     ``BatchStats.count`` (int32, saturating; int64 in torch)
``momentum=m``              ``momentum=1 - m`` (:func:`momentum_from_torch`)
``momentum=None``           ``average="cumulative"``
=========================== ==========================================

PyTorch updates its running variance with the unbiased (``m/(m-1)``) batch
variance; to continue training a converted model the way PyTorch would, use
``jn.batch_norm(..., momentum=momentum_from_torch(0.1), unbiased=True)`` and,
for NCHW tensors, ``axis=1``. The epsilon of every PyTorch norm defaults to
1e-5 (jaxnorm's layer, group and instance norms default to flax's 1e-6).

The implementation is :mod:`jaxnorm._src.torch`; this module only re-exports it.
"""

from jaxnorm._src.torch import batch_norm_from_torch as batch_norm_from_torch
from jaxnorm._src.torch import batch_norm_to_torch as batch_norm_to_torch
from jaxnorm._src.torch import group_norm_from_torch as group_norm_from_torch
from jaxnorm._src.torch import group_norm_to_torch as group_norm_to_torch
from jaxnorm._src.torch import instance_norm_from_torch as instance_norm_from_torch
from jaxnorm._src.torch import instance_norm_to_torch as instance_norm_to_torch
from jaxnorm._src.torch import layer_norm_from_torch as layer_norm_from_torch
from jaxnorm._src.torch import layer_norm_to_torch as layer_norm_to_torch
from jaxnorm._src.torch import momentum_from_torch as momentum_from_torch
from jaxnorm._src.torch import momentum_to_torch as momentum_to_torch

__all__ = [
    "batch_norm_from_torch",
    "batch_norm_to_torch",
    "group_norm_from_torch",
    "group_norm_to_torch",
    "instance_norm_from_torch",
    "instance_norm_to_torch",
    "layer_norm_from_torch",
    "layer_norm_to_torch",
    "momentum_from_torch",
    "momentum_to_torch",
]
