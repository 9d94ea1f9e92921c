from click.testing import CliRunner

from servescope.cli import main


def test_lab_rejects_an_unknown_name_with_the_list():
    result = CliRunner().invoke(main, ["lab", "warp-drive"])
    assert result.exit_code == 2
    for name in ("convoy", "preemption", "prefix-cache", "spec", "saturation"):
        assert name in result.output


def test_lab_help_describes_each_experiment():
    from servescope.harness.orchestration.lab import LABS

    result = CliRunner().invoke(main, ["lab", "--help"])
    assert result.exit_code == 0
    for name, lab in LABS.items():
        assert name in result.output and lab.experiment_label in result.output and lab.control_label in result.output
