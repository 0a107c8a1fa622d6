"""Shared assertions for CLI tests (imported by the test modules of this folder)."""


def assert_usage_error(result, needle):
    """Bad input: exit status 2, exactly one line `hvdtrain: error: ...` holding `needle`, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("hvdtrain: error: "), lines
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
