"""The random rows behind R's statistics: a CPU generator of their own that `torch.compile` traces without a break.

Each decorrelated forward uses a random fraction of its rows (tokens) for R's statistics. They are drawn from a
generator of their own ([`RowSampler`]), not torch's global one, so that a DBP run and a BP run with one seed
draw the same masks and dropout; its state is saved with checkpoints, so a resumed run draws what an uninterrupted
one would.
"""

from __future__ import annotations

import weakref

import torch

# Why a custom op: the rows for R's statistics come from a generator of their own, so that sampling them leaves the
# global RNG (masking, dropout) alone and BP and DBP runs draw the same masks. torch.compile cannot trace a
# torch.Generator argument (a graph break in every decorrelated forward) and replaces global-RNG calls with its own
# seeds, which would change the masks. An opaque op that reads and advances the generator's state, held in a tensor,
# traces without a break and draws exactly what the eager generator would. Guarded so that the module can be loaded
# twice (as hf_dbp and as a checkpoint's remote code) in one process.
if hasattr(torch.ops, "hf_dbp") and hasattr(torch.ops.hf_dbp, "sample_rows"):
    _sample_rows = torch.ops.hf_dbp.sample_rows
else:

    @torch.library.custom_op("hf_dbp::sample_rows", mutates_args=("generator_state",))
    def _sample_rows(num_rows: int, num_samples: int, generator_state: torch.Tensor) -> torch.Tensor:
        """`num_samples` distinct row indices out of `num_rows`, advancing the generator state in place."""
        generator = torch.Generator()
        generator.set_state(generator_state)
        index = torch.randperm(num_rows, generator=generator, device="cpu")[:num_samples]
        generator_state.copy_(generator.get_state())
        return index

    @_sample_rows.register_fake
    def _(num_rows: int, num_samples: int, generator_state: torch.Tensor) -> torch.Tensor:
        return torch.empty(num_samples, dtype=torch.long, device="cpu")


# On an accelerator the indices are drawn there: a CPU draw would be copied to the device in every decorrelated
# forward, and a copy from pageable host memory waits for the device. The state stays the CPU generator's (so
# checkpoints and resuming are unchanged): each draw takes one seed from it, on the host, and permutes on the device
# with a generator seeded by it. Reproducible on one kind of device; a GPU draws other rows than the CPU.
if hasattr(torch.ops, "hf_dbp") and hasattr(torch.ops.hf_dbp, "sample_rows_on_device"):
    _sample_rows_on_device = torch.ops.hf_dbp.sample_rows_on_device
else:

    @torch.library.custom_op("hf_dbp::sample_rows_on_device", mutates_args=("generator_state",))
    def _sample_rows_on_device(
        like: torch.Tensor, num_rows: int, num_samples: int, generator_state: torch.Tensor
    ) -> torch.Tensor:
        """`num_samples` distinct row indices out of `num_rows`, on `like`'s device; advances the state."""
        generator = torch.Generator()
        generator.set_state(generator_state)
        seed = int(torch.randint(0, 2**62, (), generator=generator))  # a CPU tensor: no device is read
        generator_state.copy_(generator.get_state())
        device_generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randperm(num_rows, generator=device_generator, device=like.device)[:num_samples]

    @_sample_rows_on_device.register_fake
    def _(like: torch.Tensor, num_rows: int, num_samples: int, generator_state: torch.Tensor) -> torch.Tensor:
        return torch.empty(num_samples, dtype=torch.long, device=like.device)


class RowSampler:
    """A CPU random generator for the rows of R's statistics that `torch.compile` traces without a graph break.

    It draws the same sequence as a `torch.Generator` with the same state and has its `manual_seed`,
    `get_state` and `set_state`, so checkpoints save and restore it the same way. Several
    [`Decorrelation`] modules share one sampler, as they would share one generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        self.state = generator.get_state()

    @classmethod
    def from_generator(cls, generator: torch.Generator) -> RowSampler:
        """A sampler that continues from `generator`'s current state (the generator itself does not advance)."""
        sampler = cls()
        sampler.set_state(generator.get_state())
        return sampler

    def manual_seed(self, seed: int) -> RowSampler:
        self.state.copy_(torch.Generator().manual_seed(seed).get_state())
        return self

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        self.state.copy_(state)

    def sample(self, num_rows: int, num_samples: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """`num_samples` distinct indices out of `num_rows`, a long tensor on `like`'s device (default CPU)."""
        if like is None or like.device.type == "cpu":
            return _sample_rows(num_rows, num_samples, self.state)
        return _sample_rows_on_device(like, num_rows, num_samples, self.state)


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch.Generator -> its RowSampler


def as_row_sampler(generator: RowSampler | torch.Generator | None) -> RowSampler | None:
    """`generator` as a [`RowSampler`].

    A `torch.Generator` is converted once, from its state at the first call: every later call with the same
    generator returns the same sampler, so modules built from one generator still draw from one sequence (the
    generator itself no longer advances).
    """
    if generator is None or (hasattr(generator, "sample") and hasattr(generator, "get_state")):
        return generator  # a RowSampler, also one from another copy of this module (remote code)
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"the generator for the statistics' rows must be a CPU generator, got {generator.device}")
        if generator not in _SAMPLERS:
            _SAMPLERS[generator] = RowSampler.from_generator(generator)
        return _SAMPLERS[generator]
    raise TypeError(f"generator must be a RowSampler, a torch.Generator or None, got {type(generator).__name__}")
