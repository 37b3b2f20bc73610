"""A page checksum computed where the pages live (on the GPU for the GPU transports).

A position-weighted sum of the pages' 32-bit words in int64. Integer addition wraps modulo 2**64, so
the result does not depend on the reduction order: the sender's device and the receiver's (or the
CPU) agree bit for bit. The weights make swapped blocks, shifted bytes and flipped bits all change
it. Cost: one int64 copy of the pages and one reduction, which is why it is a knob (default off).
"""

from __future__ import annotations

import torch

_WEIGHT_PERIOD = 65521  # weights 1..65521: a prime period, so a block moved by a whole block still changes the sum


def page_checksum(pages: torch.Tensor) -> int:
    """Checksum of `pages` (any shape and 16/32-bit dtype), as an unsigned 64-bit int."""
    flat = pages.contiguous().view(-1)
    words = flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 else flat.view(torch.int16)
    words = words.to(torch.int64)
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % _WEIGHT_PERIOD + 1
    return int((words * weights).sum().item()) & ((1 << 64) - 1)
