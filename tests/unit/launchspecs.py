"""make_spec from keyword options, the way a command's click options arrive (tests name only what they set)."""

from hvdtrain.launching.options import ElasticOptions, LaunchOptions, split
from hvdtrain.launching.spec import make_spec


def spec_of(command, *, environ=None, check_cmd=True, default_controller=None, **options):
    launch, elastic, rest = split(options, LaunchOptions, ElasticOptions)
    assert not rest, f"not launch options: {sorted(rest)}"
    return make_spec(
        list(command), launch, elastic, environ=environ, check_cmd=check_cmd, default_controller=default_controller
    )
