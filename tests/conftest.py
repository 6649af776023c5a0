import pytest

TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)
"""A ViTMAE small enough for exact checks in milliseconds: 16 patches of 4x4x3 = 48 values, width 24."""


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)
