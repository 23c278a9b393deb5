"""Restoring snapshot tensors into live tensors in place, and the cheap confirm of it.

`restore_tensors_` copies snapshot tensors into live tensors in place (one `_foreach_copy_` for
every same-shape/dtype/device pair; host to CUDA on the copy engine's side stream, `upload_`),
then confirms cheaply with `confirm_restored` (version counters advanced on every tensor; sampled
raw bits of two tensors equal the snapshot's).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from esper.tolaria.recovery.copy_engine import upload_

SAMPLES_PER_TENSOR = 8  # evenly spaced elements per sampled tensor, from the first
CONFIRM_SAMPLED_TENSORS = 2
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (destination, source)


class RestoreError(RuntimeError):
    """Live and snapshot tensors do not correspond, or the restored bits do not match."""


@dataclass(frozen=True)
class RestoreResult:
    tensors: int
    nbytes: int
    foreach: int  # tensors copied by the single _foreach_copy_ (or the host-to-CUDA stream copy)
    fallback: int  # tensors copied one by one (dtype differs, or devices other than host to CUDA)


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested mappings/lists, keyed by its dotted path."""
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, prefix, out)
    return out


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, (dict, Mapping)):  # dict first: the common case skips the slow ABC check
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), out)


def restore_tensors_(live: Mapping[str, Any], snap: Mapping[str, Any], *, verify: bool = True) -> RestoreResult:
    """Copy every tensor of `snap` into the tensor at the same path in `live`, in place.

    `live` and `snap` may be nested (e.g. `{"model": model.state_dict(), "optimizer":
    optimizer.state_dict()["state"]}`: both hand out the live tensors themselves). They must hold
    the same tensor paths with the same shapes, else `RestoreError` names the first difference and
    nothing is copied. With `verify`, `confirm_restored` checks the result; a failure raises
    `RestoreError`."""
    plan = _plan(flatten_tensors(live), flatten_tensors(snap))
    versions = copy_in_place_(plan.dst, plan.src)
    slow_versions = [dst._version for dst, _ in plan.slow]
    with torch.no_grad():
        for dst, src in plan.slow:
            dst.copy_(src)  # dtype or device differs: copy_ converts
    problem = confirm_restored(plan.dst, plan.src, versions) if verify else ""
    if verify and any(dst._version == v for (dst, _), v in zip(plan.slow, slow_versions, strict=True)):
        problem = problem or "a converted (dtype/device) tensor was not written"
    if problem:
        raise RestoreError(f"restore did not take effect: {problem}")
    return RestoreResult(tensors=len(plan.dst) + len(plan.slow), nbytes=plan.nbytes, foreach=len(plan.dst),
                         fallback=len(plan.slow))


def copy_in_place_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> list[int]:
    """Copy `src` into `dst` (same shapes and dtypes), grad off since `dst` may be leaf parameters:
    one `_foreach_copy_` where the devices match, host to CUDA on the side stream (`upload_`).
    Returns the version counters from before, for `confirm_restored`."""
    versions = [t._version for t in dst]
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # cheaper than a no_grad() frame on this path
    try:
        if dst and dst[0].device == src[0].device and dst[-1].device == src[-1].device:
            torch._foreach_copy_(dst, src)  # correct for any mix of devices; fast when they match
        elif dst:
            _copy_across_devices(dst, src)
    finally:
        torch.set_grad_enabled(grad_was)
    return versions


def _copy_across_devices(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    up: Pairs = []
    rest: Pairs = []
    for d, s in zip(dst, src, strict=True):
        (up if d.is_cuda and s.is_cpu else rest).append((d, s))
    if up:
        upload_([d for d, _ in up], [s for _, s in up])
    if rest:
        torch._foreach_copy_([d for d, _ in rest], [s for _, s in rest])


@dataclass
class _Plan:
    dst: list[torch.Tensor]
    src: list[torch.Tensor]
    slow: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


def _plan(live: dict[str, torch.Tensor], snap: dict[str, torch.Tensor]) -> _Plan:
    if live.keys() != snap.keys():
        only_live = sorted(live.keys() - snap.keys())[:3]
        only_snap = sorted(snap.keys() - live.keys())[:3]
        raise RestoreError(
            f"live and snapshot tensors differ (only live: {only_live}, only snapshot: {only_snap}): "
            "rebuild the model/optimizer structure from the snapshot's manifest before restoring"
        )
    plan = _Plan([], [], [], 0)
    for key, dst in live.items():
        src = snap[key]
        if dst.shape != src.shape:
            raise RestoreError(
                f"tensor {key!r} is {tuple(dst.shape)} live but {tuple(src.shape)} in the snapshot: "
                "rebuild the structure before restoring"
            )
        if dst.dtype == src.dtype and (dst.device == src.device or (dst.is_cuda and src.is_cpu)):
            plan.dst.append(dst)
            plan.src.append(src)
        else:
            plan.slow.append((dst, src))
        plan.nbytes += dst.nbytes
    return plan


def confirm_restored(dst: list[torch.Tensor], src: list[torch.Tensor], versions_before: list[int]) -> str:
    """The confirm step of a fast rollback: "" if the restore took effect, else what is wrong.

    Two cheap checks instead of a checksum that would cost more than the copy it confirms:
    every destination's version counter advanced (each tensor was written in place, none was
    skipped or swapped for a new object), and the raw bits of SAMPLES_PER_TENSOR evenly spaced
    elements of CONFIRM_SAMPLED_TENSORS tensors (first and last) equal the snapshot's. The copy
    itself is exact by construction; tests prove bit-exactness with `state_checksum`."""
    for i, (t, before) in enumerate(zip(dst, versions_before, strict=True)):
        if t._version == before:
            return f"tensor #{i} {tuple(t.shape)} was not written"
    if not dst:
        return ""
    picks = {0, len(dst) - 1}
    for i in sorted(picks)[:CONFIRM_SAMPLED_TENSORS]:
        if not samples_equal(dst[i], src[i]):
            return f"tensor #{i} {tuple(dst[i].shape)} differs from the snapshot at sampled elements"
    return ""


def samples_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The raw bits of SAMPLES_PER_TENSOR evenly spaced elements are equal (NaN equals NaN)."""
    if _plain_cpu(a) and _plain_cpu(b) and a.dtype == b.dtype and a.numel() == b.numel():
        return _host_samples_equal(a, b)
    sa, sb = _strided_sample(a), _strided_sample(b)
    if sa.device != sb.device:  # a live CUDA tensor against its host snapshot: 8 elements read back
        sa, sb = sa.cpu(), sb.cpu()
    return torch.equal(sa, sb) or torch.equal(_bits(sa), _bits(sb))


def _plain_cpu(t: torch.Tensor) -> bool:
    return t.is_cpu and t.layout is torch.strided and not t.is_quantized and t.is_contiguous()


def _host_samples_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`samples_equal` for contiguous CPU tensors, reading the raw bytes through a memoryview:
    the same comparison without four torch dispatches per tensor, which run cache-cold right
    after a rollback's copy and dominated the confirm phase."""
    n, size = a.numel(), a.element_size()
    code = _MEMORYVIEW_CODE.get(size)
    if n == 0 or code is None:
        return n == 0 or torch.equal(_sample_view(a), _sample_view(b))
    count, step = _sample_positions(n)
    span = ((count - 1) * step + 1) * size
    va = memoryview((ctypes.c_char * span).from_address(a.data_ptr())).cast("B").cast(code)
    vb = memoryview((ctypes.c_char * span).from_address(b.data_ptr())).cast("B").cast(code)
    return va[::step] == vb[::step]


# Unsigned integer views: the comparison is of bits, so NaN equals NaN.
_MEMORYVIEW_CODE: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def sample_bits(t: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLES_PER_TENSOR evenly spaced elements of `t` (the first included) as raw
    integer bits, copied: exact to compare (no rounding; NaN equals NaN)."""
    with torch.no_grad():
        return _sample_view(t).clone()


def _sample_view(t: torch.Tensor) -> torch.Tensor:
    """`sample_bits` as a view of `t` (no copy): for comparing on the spot, with grad disabled."""
    return _bits(_strided_sample(t))


def _strided_sample(t: torch.Tensor) -> torch.Tensor:
    n = t.numel()
    flat = t if t.is_contiguous() else t.contiguous()
    if n == 0:
        return flat.reshape(-1)
    count, step = _sample_positions(n)
    return flat.as_strided((count,), (step,), flat.storage_offset())


def _sample_positions(n: int) -> tuple[int, int]:
    """(how many, element stride) of the evenly spaced samples of an n-element tensor (n > 0)."""
    count = min(n, SAMPLES_PER_TENSOR)
    return count, max(1, (n - 1) // max(1, count - 1))


def _bits(sample: torch.Tensor) -> torch.Tensor:
    ints = _INT_OF_SIZE.get(sample.element_size())
    if ints is not None and not sample.is_complex():
        return sample.view(ints)
    return sample.contiguous().view(torch.uint8)
