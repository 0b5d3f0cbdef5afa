"""Quality benchmark: every training and detection variant is a valid override of the defaults."""
import pytest

from anoddpm.config import Config
from benchmarks.quality import DETECT_VARIANTS, TRAIN_VARIANTS, parse_args


@pytest.mark.parametrize("variant", sorted(TRAIN_VARIANTS))
def test_train_variants_are_valid_configs(variant):
    cfg = Config()
    for section, values in TRAIN_VARIANTS[variant].items():
        cfg = cfg.override(section, **values)
    cfg.validate()
    for section, values in TRAIN_VARIANTS[variant].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize("variant", sorted(DETECT_VARIANTS))
def test_detect_variants_are_valid_configs(variant):
    values = {k: v for k, v in DETECT_VARIANTS[variant].items() if v is not None}
    Config().override("detect", **values).validate()


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        parse_args(["--configs", "no_such_variant"])
