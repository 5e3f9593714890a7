"""distill.eval.far: the one spelling of FAR keys, and reading the other spellings (eval_ijbc.py's) as it."""

import pytest

from distill.eval.far import (
    IJB_FARS,
    SUMMARY_IJB_FARS,
    VERIFICATION_FARS,
    far_key,
    normalise_far_keys,
    normalise_results,
)


def test_far_keys_are_mantissa_exponent_without_zero_padding():
    assert [far_key(f) for f in IJB_FARS] == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
    assert [far_key(f) for f in VERIFICATION_FARS] == ["1e-3", "1e-4"]
    assert [far_key(f) for f in SUMMARY_IJB_FARS] == ["1e-4", "1e-5"]
    assert far_key(0.0001) == far_key(1e-4) == "1e-4"
    assert (far_key(5e-4), far_key(2.5e-4), far_key(1.0)) == ("5e-4", "2.5e-4", "1e0")
    for bad in (0.0, -1e-3, 2.0, float("nan"), "x"):
        with pytest.raises(ValueError):
            far_key(bad)


def test_legacy_far_keys_read_as_todays():
    old = {"1e-06": 0.1, "1e-05": 0.2, "0.0001": 0.3, "0.001": 0.4, "0.01": 0.5, "0.1": 0.6}  # str(far)
    want = dict(zip(["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"], old.values(), strict=True))
    assert normalise_far_keys(old) == want
    assert normalise_far_keys({"1e-04": 1, "1e-3": 2, "other": 3}) == {"1e-4": 1, "1e-3": 2, "other": 3}
    assert normalise_far_keys({"1e-4": 1, "0.0001": 2}) == {"1e-4": 1}  # today's spelling wins
    result = {"metrics": {"lfw": {"tar_at_far": {"1e-3": {"tar": 0.9}}}}, "ijb": {"tar_at_far": {"0.0001": 0.5}},
              "stages": [{"ijb": {"tar_at_far": {"1e-05": 0.4}}}], "auc": 0.9}
    assert normalise_results(result) == {"metrics": {"lfw": {"tar_at_far": {"1e-3": {"tar": 0.9}}}},
                                         "ijb": {"tar_at_far": {"1e-4": 0.5}},
                                         "stages": [{"ijb": {"tar_at_far": {"1e-5": 0.4}}}], "auc": 0.9}
    assert result["ijb"]["tar_at_far"] == {"0.0001": 0.5}  # not changed in place
