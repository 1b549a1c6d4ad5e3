"""The DeepSeek-shaped presets have the published models' sizes, counted from shapes alone."""

import pytest

from configs.deepseek import PUBLISHED, SIZES, get_config, parameter_counts
from moe_jax.config_validation import validate_config


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_preset_parameter_counts_match_the_published_ones(size):
  """Totals within 1%. Per token (the weights a token is multiplied by, output head included,
  input embedding lookup not): within 1.1% of V3's "37B" and 2.2% of V2-Lite's "2.4B", which
  are rounded to two figures (2.45B and 36.6B by this count)."""
  counts = parameter_counts(get_config(size))
  total, per_token = PUBLISHED[size]
  assert abs(counts["total"] / total - 1) < 0.01, counts
  assert abs(counts["per_token"] / per_token - 1) < {"v3": 0.011, "v2_lite": 0.022}[size], counts


@pytest.mark.parametrize("size", list(SIZES))
def test_presets_are_valid_configs(size):
  validate_config(get_config(size + ",steps=1000"), 8, backend="gpu")


def test_a_preset_file_without_a_size_names_the_sizes():
  with pytest.raises(ValueError, match=r"needs a size: --config=configs/deepseek.py:SIZE, SIZE "
                                       r"one of \['v3', 'v2_lite', 'bench_1b'\]"):
    get_config()
  with pytest.raises(ValueError, match="unknown size 'v4'"):
    get_config("v4")
