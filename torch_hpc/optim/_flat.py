"""One flat vector for a list of tensors, and back (one cat, one foreach copy: these run every
step, and a Python call per tensor cost 3 us each)."""
import torch


def flatten(tensors, dtype=torch.float32) -> torch.Tensor:
    """The tensors' values end to end in one new 1-D tensor (dtype=None keeps theirs)."""
    with torch.no_grad():
        return torch.cat([t.reshape(-1) if dtype is None or t.dtype == dtype else t.reshape(-1).to(dtype)
                          for t in tensors])


def flatten_into(out: torch.Tensor, tensors) -> torch.Tensor:
    """flatten(tensors) written into `out` (float32, numel of them all): no allocation per call
    when the tensors are float32."""
    with torch.no_grad():
        return torch.cat([t.reshape(-1) if t.dtype == out.dtype else t.reshape(-1).to(out.dtype) for t in tensors],
                         out=out)


def slices(flat: torch.Tensor, tensors):
    """Consecutive views of `flat` shaped like each of `tensors`."""
    offset = 0
    for t in tensors:
        yield flat[offset:offset + t.numel()].view_as(t)
        offset += t.numel()


def unflatten_into(flat: torch.Tensor, tensors) -> None:
    """Copies consecutive slices of `flat` into `tensors`, in place (cast to each one's dtype)."""
    tensors = list(tensors)
    with torch.no_grad():
        if all(t.is_contiguous() for t in tensors):
            torch._foreach_copy_([t.view(-1) for t in tensors],
                                 list(flat.split([t.numel() for t in tensors])))
            return
        for t, values in zip(tensors, slices(flat, tensors)):
            t.copy_(values)
