import pytest
import torch

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.frozen import resolve_frozen_dtype


@pytest.mark.parametrize("precision, expected", [("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16),
                                                 ("32-true", torch.float32), ("16-mixed", torch.float32)])
def test_auto_follows_the_trainer_precision(precision, expected):
    assert resolve_frozen_dtype("auto", precision) == expected


def test_explicit_settings_win_and_single_dtype_shards_keep_fp32():
    assert resolve_frozen_dtype("float32", "bf16-mixed") == torch.float32
    assert resolve_frozen_dtype("bfloat16", "32-true") == torch.bfloat16
    assert resolve_frozen_dtype("auto", "bf16-mixed", single_dtype_shards=True) == torch.float32
    with pytest.raises(ConfigError, match="FSDP"):
        resolve_frozen_dtype("bfloat16", "bf16-mixed", single_dtype_shards=True)
    with pytest.raises(ConfigError, match="auto, float32 or bfloat16"):
        resolve_frozen_dtype("float16", "bf16-mixed")
