"""Testing distributed code on N ranks: the pytest plugin (`hvdtrain.testing.plugin`, registered as the pytest11
entry point `hvdtrain`: `@pytest.mark.ranks(2)`, fixtures `world`, `hvd`, `comm`, `rank_tmp_path`) and what a test
calls on its ranks: `current()` (its World) and `assert_all`, the collective assertion. docs/testing.md."""

from hvdtrain.testing.world import World, assert_all, current

__all__ = ["World", "assert_all", "current"]
