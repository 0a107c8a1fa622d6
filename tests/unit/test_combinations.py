"""config.COMBINATIONS, the one table of what combines with what: its rows as validate(), the launching side and the
Trainer read them (the messages themselves are checked through the real CLI in test_bad_input.py)."""

import pytest

from hvdtrain.config import (
    ASYNC_NOT_ELASTIC,
    COMBINATIONS,
    GROUPS_NOT_ELASTIC,
    MODEL_NOT_ELASTIC,
    PIPELINE_NOT_ELASTIC,
    SHARDED_NOT_ELASTIC,
    TIMELINE_NOT_ELASTIC,
    TrainConfig,
    check_combinations,
    conflicts,
    needs_mpi,
)
from hvdtrain.errors import ConfigError


@pytest.mark.parametrize(
    "options,message",
    [
        ({"update": "async"}, ASYNC_NOT_ELASTIC),
        ({"strategy": "pipeline", "stages": 2}, PIPELINE_NOT_ELASTIC),
        ({"timeline": True}, TIMELINE_NOT_ELASTIC),
        ({"timeline_steps": "2:3"}, TIMELINE_NOT_ELASTIC),
        ({"grad_groups": 2}, GROUPS_NOT_ELASTIC),
        ({"strategy": "model"}, MODEL_NOT_ELASTIC),
        ({"shard_optimizer": True}, SHARDED_NOT_ELASTIC),
    ],
)
def test_what_cannot_be_elastic_is_refused_only_when_elastic(options, message):
    cfg = TrainConfig(**options).validate().with_defaults()
    assert conflicts(cfg) == []
    assert conflicts(cfg, elastic=True) == [message]
    with pytest.raises(ConfigError, match="cannot"):
        check_combinations(cfg, elastic=True)


def test_a_plain_job_combines_with_every_launch():
    cfg = TrainConfig().validate().with_defaults()
    assert conflicts(cfg, elastic=True, gloo=True, ranks=8) == [] and not needs_mpi(cfg)
    assert conflicts(TrainConfig(grad_groups=0).validate(), elastic=True) == []  # Horovod's own default: no groups


def test_mpi_jobs_refuse_gloo_and_the_model_strategy_more_than_one_rank():
    for options, what in [
        ({"update": "async"}, "--update async"),
        ({"strategy": "pipeline", "stages": 2}, "--strategy pipeline"),
    ]:
        cfg = TrainConfig(**options).validate().with_defaults()
        assert needs_mpi(cfg)
        [message] = conflicts(cfg, gloo=True)
        assert message.startswith(f"{what} needs MPI") and "drop --gloo" in message
    model = TrainConfig(strategy="model").validate()
    assert conflicts(model, ranks=1) == []
    [message] = conflicts(model, ranks=3)
    assert "one replica on one rank, but this job has 3 ranks (-np 3)" in message


def test_the_first_row_that_holds_is_said_and_every_row_formats():
    cfg = TrainConfig(update="async", timeline=True)
    assert conflicts(cfg, elastic=True) == [ASYNC_NOT_ELASTIC, TIMELINE_NOT_ELASTIC]
    for rule in COMBINATIONS:
        assert rule.meets in ("options", "elastic", "gloo", "ranks")
        assert "{" not in rule.message.format(cfg=cfg, ranks=2)
