"""The examples in the docstrings run and print what they say."""

import doctest

import pytest

import cupyflash._api
import cupyflash._cupy_decode
import cupyflash._reference_sequences
import cupyflash._sequences
import cupyflash._tensor_map
import cupyflash.reference


@pytest.mark.parametrize("module", [cupyflash._api, cupyflash.reference,
                                    cupyflash._sequences, cupyflash._reference_sequences,
                                    cupyflash._tensor_map, cupyflash._cupy_decode],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0
