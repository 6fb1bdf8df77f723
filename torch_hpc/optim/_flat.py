"""One flat vector for a list of tensors, and back."""
import torch


def flatten(tensors, dtype=torch.float32) -> torch.Tensor:
    """The tensors' values end to end in one new 1-D tensor (dtype=None keeps theirs)."""
    return torch.cat([t.detach().reshape(-1) if dtype is None else t.detach().reshape(-1).to(dtype)
                      for t in tensors])


def slices(flat: torch.Tensor, tensors):
    """Consecutive views of `flat` shaped like each of `tensors`."""
    offset = 0
    for t in tensors:
        yield flat[offset:offset + t.numel()].view_as(t)
        offset += t.numel()


def unflatten_into(flat: torch.Tensor, tensors) -> None:
    """Copies consecutive slices of `flat` into `tensors`, in place (cast to each one's dtype)."""
    for t, values in zip(tensors, slices(flat, tensors)):
        t.detach().copy_(values)
