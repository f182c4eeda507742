"""The tiled NumPy backend with small blocks, so that short sequences cross many blocks.

Through the public function the blocks are 256 rows, which only long sequences leave;
here ``BLOCK_M`` and ``BLOCK_N`` are drawn small, so that the running maximum, the rescale
of ``acc`` and the skipping of causal blocks are exercised on every example.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from accuracy import check_attention
from cupyflash import _api, _numpy_backend
from strategies import AttentionCase, attention_cases

# See test_attention.py: OpenBLAS flags 0 * -inf on padding lanes; no NaN reaches a result.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")

BLOCKS = st.sampled_from([1, 2, 3, 7, 16, 32, 64])


@given(case=attention_cases(max_len=150, max_head_dim=64), block_m=BLOCKS, block_n=BLOCKS)
@example(case=AttentionCase("float32", Lq=40, Lk=100, D=8, Dv=8, causal=True, seed=1),
         block_m=16, block_n=7)
@example(case=AttentionCase("float16", Lq=100, Lk=40, D=8, Dv=8, causal=True,
                            neg_inf="prefix", seed=2), block_m=7, block_n=16)
def test_small_blocks_match_reference(case, block_m, block_n):
    q, k, v, scale = case.inputs()
    problem = _api.validate_attention("attention", q, k, v, case.causal, scale)
    out, lse = _numpy_backend.attention_forward(q, k, v, problem, block_m=block_m,
                                                block_n=block_n)
    check_attention(out, lse, q, k, v, causal=case.causal, scale=scale)


@given(case=attention_cases(causal=st.just(False), neg_inf=st.just("none"), max_len=150,
                            max_head_dim=32))
def test_keys_sorted_by_score_rescale_every_block(case):
    """Keys in ascending order of score raise the running maximum in every key block."""
    q, k, v, scale = case.inputs()
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2))
    order = np.argsort(s.reshape(-1, case.Lk).mean(axis=0) * np.sign(scale or 1.0))
    k, v = k[..., order, :], v[..., order, :]
    problem = _api.validate_attention("attention", q, k, v, False, scale)
    out, lse = _numpy_backend.attention_forward(q, k, v, problem, block_m=8, block_n=4)
    check_attention(out, lse, q, k, v, causal=False, scale=scale)
