"""What a tensor's name says about where it sits: the block (layer) of which stack. A decoder's
blocks are ``blk.N.*``; other stacks put a prefix before theirs (a vision tower's ``v.blk.N.*``,
an audio tower's ``a.blk.N.*``, an encoder's ``enc.blk.N.*``); embeddings, norms, the output
and a projector's ``mm.N.*`` belong to no block."""

from __future__ import annotations

import re
from typing import Callable, Sequence

# group 1 is the block index; the first "blk.N." counts
BLOCK_RE = re.compile(r"^(?:[^.]+\.)*?blk\.(\d+)\.")


def block(name: str) -> tuple[str, int] | None:
    """The stack and index of the block a tensor belongs to, or None outside every block.

    Example:
        >>> block("blk.3.attn_q.weight"), block("v.blk.0.ffn_up.weight"), block("mm.0.weight")
        (('blk', 3), ('v.blk', 0), None)
    """
    m = BLOCK_RE.match(name)
    return (name[:m.start(1) - 1], int(m.group(1))) if m else None


def layer_key(tensors: Sequence) -> Callable:
    """A sort key for loading ``tensors`` (``TensorInfo``s) layer by layer: embeddings first,
    then each stack's blocks in order (stacks in the order they start in the file), then the
    rest (norms, output, projector); file order within each."""
    stacks: dict[str, int] = {}
    for t in sorted(tensors, key=lambda t: t.offset):
        b = block(t.name)
        if b is not None:
            stacks.setdefault(b[0], len(stacks))

    def key(t):
        b = block(t.name)
        if b is not None:
            return (1, stacks[b[0]], b[1], t.offset)
        return (0 if "embd" in t.name else 2, 0, 0, t.offset)

    return key
