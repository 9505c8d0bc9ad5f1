"""The training forward and backward synchronise with the host a fixed number of times per
batch, never per layer.

The routing of a packed batch (``RunRouting`` / ``SentenceLayout`` in
``training.model.attention``) is planned on the host once per forward and shared by every
layer; a block that read a device value (``.item()``, ``if tensor:``), asked for a
data-dependent shape (``nonzero``, a boolean mask index) or copied host data to the device
(``torch.tensor(list, device=...)``, ``.to(device)``) would stall the accelerator once per
layer. On CPU nothing actually waits, so ``count_syncs`` counts the *calls* that would: a
model of 2 layers and one of 8 (GPTHF: the encoder and the body deepened separately) must
make exactly the same calls, forward and backward. The last tests prove that the counter
sees each kind of sync when a block adds one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests._model_helpers import PAD, one_torch_thread, row_from_documents, tiny_config
from training.data.collate import IGNORE_INDEX, collate_blocks
from training.model import Block, Transformer, build_model
from training.model.pruning import PruningRecord

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

aten = torch.ops.aten

# -- the counter ------------------------------------------------------------------------------

# Python-level calls that read a device value on the host, or whose output size depends on the
# data (the device computes it, the host waits to allocate).
_ALWAYS: dict[Any, str] = {
    **{
        getattr(Tensor, name): f"Tensor.{name}"
        for name in (
            "item",
            "tolist",
            "__bool__",
            "__int__",
            "__float__",
            "__index__",
            "__complex__",
            "__format__",
            "__repr__",
            "cpu",
            "numpy",
            "nonzero",
            "argwhere",
            "masked_select",
            "unique",
            "unique_consecutive",
            "bincount",
        )
    },
    **{
        getattr(torch, name): f"torch.{name}"
        for name in (
            "nonzero",
            "argwhere",
            "masked_select",
            "unique",
            "unique_consecutive",
            "bincount",
        )
    },
}
_TO_DEVICE = {Tensor.to: "Tensor.to(device)", Tensor.cuda: "Tensor.cuda"}
_FROM_DATA = {
    torch.tensor: "torch.tensor(device=)",
    torch.as_tensor: "torch.as_tensor(device=)",
    torch.asarray: "torch.asarray(device=)",
    Tensor.new_tensor: "Tensor.new_tensor(device=)",
}
_MASK_INDEX = {Tensor.__getitem__: "Tensor[bool mask]", Tensor.__setitem__: "Tensor[bool mask]="}
_REPEATS = {torch.repeat_interleave, Tensor.repeat_interleave}

# The same at the dispatcher, which also sees what composite ops and autograd do inside.
_ALWAYS_ATEN = {
    aten._local_scalar_dense,  # item(), int(), bool(), float() of any tensor
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,
    aten.equal,
    aten.is_nonzero,
}
_REPEATS_ATEN = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX_ATEN = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _is_mask(x: object) -> bool:
    if isinstance(x, Tensor):
        return x.dtype in (torch.bool, torch.uint8)
    if isinstance(x, tuple | list):
        return any(_is_mask(i) for i in x)
    return False


def _names_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``Tensor.to``'s arguments move the tensor to a device (not only a dtype)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, torch.device | str | int | Tensor) for a in args)


def python_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The kind of host sync a Python-level torch call makes, or None."""
    try:
        if func in _ALWAYS:
            return _ALWAYS[func]
        if func in _TO_DEVICE and (func is Tensor.cuda or _names_device(args[1:], kwargs)):
            return _TO_DEVICE[func]
        if func in _FROM_DATA and kwargs.get("device") is not None:
            return _FROM_DATA[func]
        if func in _MASK_INDEX and _is_mask(args[1]):
            return _MASK_INDEX[func]
        if func is torch.where and len(args) + len(kwargs) == 1:
            return "torch.where(condition)"
        if func in _REPEATS and kwargs.get("output_size") is None:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
            if isinstance(repeats, Tensor):
                return "repeat_interleave(tensor)"
    except TypeError:  # an unhashable func (a partial, a bound method): none of the above
        return None
    return None


def aten_sync(
    func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    packet = func.overloadpacket
    if packet in _ALWAYS_ATEN:
        return str(packet)
    if packet in _INDEX_ATEN and _is_mask(args[1]):
        return f"{packet}(bool mask)"
    if func in _REPEATS_ATEN and kwargs.get("output_size") is None:
        return "aten.repeat_interleave(tensor)"
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device")
        if isinstance(src, Tensor) and dst is not None and torch.device(dst) != src.device:
            return "aten.copy across devices"
    return None


class _PythonCalls(TorchFunctionMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        kind = python_sync(func, args, kwargs)
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **kwargs)


class _AtenCalls(TorchDispatchMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        kind = aten_sync(func, args, kwargs)
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter[str]]:
    """Counts, by kind, the calls inside the block that would make the host wait for an
    accelerator. Both modes are thread-local state that autograd carries into the backward."""
    counts: Counter[str] = Counter()
    with _PythonCalls(counts), _AtenCalls(counts):
        yield counts


# -- the model under test ---------------------------------------------------------------------

ROWS = [
    [[3, 1, 4], [2, 5], [6]],  # three documents, a 1-token sentence
    [[7, 2, 2, 3]],  # one document of four sentences
    [[1], [2, 3, 17, 20]],  # a long sentence (routing groups of two lengths), padding
]


def batch() -> Any:
    return collate_blocks([row_from_documents(docs) for docs in ROWS], pad_id=PAD)


def train_step_syncs(model: Transformer) -> Counter[str]:
    """Syncs of one training forward and backward (the loss as TrainWorker.step forms it)."""
    b = batch()
    model.train()
    with count_syncs() as counts:
        logits = model(b.input_ids, b.sentence_ids, b.document_ids)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            b.labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        if model.last_pruning is not None:
            loss = loss + 0.5 * model.last_pruning.kept_fraction()
        loss.backward()
    return counts


def model_of(arch: str, prune: bool, encoder: int, body: int) -> Transformer:
    torch.manual_seed(0)
    config = tiny_config(arch, n_layers=encoder + body, n_encoder_layers=encoder, prune=prune)
    if prune:  # gates that really drop keys: the pruned path, not an all-open shortcut
        config = dataclasses.replace(config, prune_dim=8, prune_init_bias=0.0)
    model = build_model(config)
    model.set_prune_alpha(4.0)
    return model


# (encoder, body) depths compared with the shallowest: each stage deepened on its own.
DEPTHS = {"gpt": [(0, 2), (0, 8)], "gpthf": [(1, 1), (7, 1), (1, 7)]}


def per_depth(arch: str, prune: bool) -> dict[tuple[int, int], Counter[str]]:
    return {d: train_step_syncs(model_of(arch, prune, *d)) for d in DEPTHS[arch]}


def growth(counts: dict[tuple[int, int], Counter[str]]) -> dict[str, list[int]]:
    """Kinds whose count differs between depths: kind -> count at each depth."""
    kinds = set().union(*counts.values())
    return {
        k: [c[k] for c in counts.values()]
        for k in sorted(kinds)
        if len({c[k] for c in counts.values()}) > 1
    }


@pytest.mark.parametrize(
    ("arch", "prune"),
    [
        ("gpt", False),
        ("gpt", True),
        ("gpthf", False),
        ("gpthf", True),
    ],
    ids=["gpt-dense", "gpt-pruned", "gpthf-dense", "gpthf-pruned"],
)
def test_host_syncs_do_not_grow_with_depth(arch: str, prune: bool) -> None:
    counts = per_depth(arch, prune)
    shallow = counts[DEPTHS[arch][0]]
    # The routing does sync (a few times per forward): the counter is looking at something.
    assert shallow["aten._local_scalar_dense"] > 0 and shallow["Tensor.tolist"] > 0
    assert not growth(counts), f"host syncs per layer, by depth {list(counts)}: {growth(counts)}"


# -- the counter catches what a block would add -----------------------------------------------


def _item(x: Tensor) -> None:
    x.sum().item()


def _branch(x: Tensor) -> None:
    if (x > 100).any():
        raise AssertionError("unreachable")


def _mask_index(x: Tensor) -> None:
    x[x > 0].sum()


def _nonzero(x: Tensor) -> None:
    (x[..., 0] > 0).nonzero()


def _from_host(x: Tensor) -> None:
    torch.tensor([1.0, 2.0], device=x.device)


def _to_device(x: Tensor) -> None:
    torch.arange(3).to(x.device)


def _in_backward(x: Tensor) -> None:
    if x.requires_grad:
        x.register_hook(lambda g: g.sum().item() and None)


INJECTED: dict[str, Callable[[Tensor], None]] = {
    "item": _item,
    "branch": _branch,
    "mask-index": _mask_index,
    "nonzero": _nonzero,
    "host-data": _from_host,
    "to-device": _to_device,
    "backward-item": _in_backward,
}


@pytest.mark.parametrize("sync", INJECTED)
@pytest.mark.parametrize("arch", ["gpt", "gpthf"])
def test_a_sync_per_block_is_caught(arch: str, sync: str, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = Block.forward

    def syncing(self: Block, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        INJECTED[sync](x)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", syncing)
    grown = growth(per_depth(arch, prune=False))
    assert grown, f"a {sync} sync in every block went unnoticed"
    for kind, (shallow, *deep) in grown.items():
        # Whole calls per added layer: every deeper model has 6 layers more than the shallow one.
        assert all(n > shallow and (n - shallow) % 6 == 0 for n in deep), (kind, shallow, deep)


def test_pruning_totals_read_the_host_once() -> None:
    """What a training step reports of the gates (kept and gated pairs per layer): one read
    for all layers, whatever the depth."""
    reads = []
    for layers in (2, 8):
        record = PruningRecord()
        for layer in range(layers):
            record.add(layer, torch.zeros(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool))
        with count_syncs() as counts:
            kept, pairs = record.totals()
        assert kept == dict.fromkeys(range(layers), 18.0) and pairs == kept
        reads.append(counts)
    assert reads[0] == reads[1] and sum(reads[0].values()) > 0, reads
