"""The attention spec itself: which key each row sees, checked by perturbing values one key at a time."""

import pytest
import torch

from blip2_fast.attention import MaskKind, attention, attention_ref


def expected_visibility(kind, n_query, n_rows, n_keys, valid):
    """Written from DESIGN.md's table, row by row, independently of the implementation."""
    seen = torch.zeros(n_rows, n_keys, dtype=torch.bool)
    for i in range(n_rows):
        p = i + n_keys - n_rows  # key position of row i
        for j in range(n_keys):
            if not valid[j]:
                continue
            if kind == MaskKind.BIDIRECTIONAL:
                seen[i, j] = True
            elif kind == MaskKind.UNIMODAL:
                seen[i, j] = (p < n_query) == (j < n_query)
            else:
                seen[i, j] = j < n_query if p < n_query else (j < n_query or j <= p)
    return seen


def observed_visibility(kind, n_query, q, k, v, valid):
    base = attention_ref(q, k, v, mask_kind=kind, n_query=n_query, key_padding=valid[None])
    seen = torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool)
    for j in range(k.shape[2]):
        v2 = v.clone()
        v2[:, :, j] += 1.0
        out = attention_ref(q, k, v2, mask_kind=kind, n_query=n_query, key_padding=valid[None])
        seen[:, j] = (out - base).abs().amax(dim=(0, 1, 3)) > 1e-6
    return seen


@pytest.mark.parametrize("kind", list(MaskKind))
@pytest.mark.parametrize("n_query, n_rows, n_keys", [(3, 8, 8), (3, 5, 8), (3, 1, 8), (0, 6, 6), (6, 6, 6)])
def test_each_row_sees_exactly_what_the_table_says(kind, n_query, n_rows, n_keys):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 4) for n in (n_rows, n_keys, n_keys))
    valid = torch.ones(n_keys, dtype=torch.bool)
    valid[-2] = False  # a padded key in the text part
    expected = expected_visibility(kind, n_query, n_rows, n_keys, valid)
    assert torch.equal(observed_visibility(kind, n_query, q, k, v, valid), expected)


def test_rows_that_see_nothing_are_zero_and_lengths_equal_padding():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    lengths = torch.tensor([6, 2])  # sequence 1: only the 2 query keys are real
    padding = torch.arange(6)[None] < lengths[:, None]
    a = attention_ref(q, k, v, mask_kind=MaskKind.UNIMODAL, n_query=2, key_lengths=lengths)
    b = attention_ref(q, k, v, mask_kind=MaskKind.UNIMODAL, n_query=2, key_padding=padding)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a[1, :, 2:].abs().max() == 0  # text rows of sequence 1 see no key
    c = attention(q, k, v, mask_kind=MaskKind.UNIMODAL, n_query=2, key_lengths=lengths, backend="sdpa")
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key_padding=torch.ones(2, 6)), "bool"),
        (dict(key_padding=torch.ones(2, 5, dtype=torch.bool)), r"\(B, Lk\) = \(2, 6\)"),
        (dict(key_lengths=torch.ones(2)), "integer tensor of shape"),
        (dict(n_query=7), r"n_query must lie in \[0, Lk=6\]"),
        (dict(backend="cudnn"), "unknown attention backend"),
    ],
)
def test_bad_arguments(kwargs, message):
    q = k = v = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, mask_kind=MaskKind.BIDIRECTIONAL, **kwargs)
