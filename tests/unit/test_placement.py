"""train.placement: the placement is chosen once from the strategy and the update rule, names its process sets and
refuses ranks that do not fit its layout (before hvd.init: nothing here initialises Horovod)."""

import pytest

from hvdtrain.config import TrainConfig
from hvdtrain.errors import ConfigError
from hvdtrain.train.placement import DevicePipeline, ParameterServers, Placement, RankPipeline, choose


def config(**options):
    return TrainConfig(**options).validate().with_defaults()


@pytest.mark.parametrize(
    "options,kind",
    [
        ({}, Placement),
        ({"strategy": "model"}, DevicePipeline),
        ({"strategy": "hybrid", "devices_per_rank": 2}, DevicePipeline),
        ({"strategy": "pipeline", "stages": 2}, RankPipeline),
        ({"update": "async"}, ParameterServers),
        ({"update": "local-sgd"}, Placement),
        ({"shard_optimizer": True}, Placement),
    ],
)
def test_the_placement_follows_the_strategy_and_the_update(options, kind):
    assert type(choose(config(**options), 4)) is kind


def test_process_sets_name_the_workers_or_the_stages():
    assert choose(config(), 4).process_sets() == {}
    assert choose(config(update="async", ps_ranks=1), 3).process_sets() == {"group": [0, 1]}
    assert choose(config(strategy="pipeline", stages=2), 4).process_sets() == {"parts": [[0, 2], [1, 3]]}


def test_ranks_that_do_not_fit_the_layout_are_refused():
    with pytest.raises(ConfigError, match="--stages 2 does not divide 3 ranks"):
        choose(config(strategy="pipeline", stages=2), 3)
    with pytest.raises(ConfigError, match="--ps-ranks 2 leaves no worker among 2 ranks"):
        choose(config(update="async", ps_ranks=2), 2)


def test_the_start_line_says_the_layout():
    assert choose(config(), 2).describe(2) == "2 rank(s)"
    assert choose(config(update="async", ps_ranks=1, max_staleness=0), 3).describe(2) == (
        "2 worker(s) and 1 parameter server(s), max staleness 0"
    )
    assert choose(config(strategy="pipeline", stages=2, micro_batches=4), 4).describe(2) == (
        "4 rank(s) as 2 replica(s) of 2 pipeline stages (1f1b, 4 micro-batch(es) per batch)"
    )
