"""The packed layout of `rewrite::linear_q` / `embedding_q`: a little-endian bit stream per row.

The whole-values-per-byte fast path (1, 2, 4 bits) must give exactly the bytes of the generic
bit-stream packing, for any K (odd ones pad the last byte with zeros)."""
import pytest
import torch

from rewrite.kernels.quant import pack, packed_width, unpack


def _bit_stream_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    n, k = q.shape
    stream = ((q.to(torch.int32).unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(n, k * bits)
    width = packed_width(k, bits)
    stream = torch.nn.functional.pad(stream, (0, width * 8 - k * bits))
    return (stream.reshape(n, width, 8) * (1 << torch.arange(8))).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [1, 3, 7, 64, 129])
def test_pack_is_the_bit_stream_and_unpack_inverts_it(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(0, 1 << bits, (5, k), generator=g).to(torch.uint8)
    packed = pack(q, bits)
    if bits != 8:
        assert torch.equal(packed, _bit_stream_pack(q, bits))
    assert torch.equal(unpack(packed, bits, k), q)
    assert torch.equal(unpack(packed.unsqueeze(0).expand(3, -1, -1), bits, k)[2], q)  # leading dims
