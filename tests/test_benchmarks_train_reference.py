"""benchmarks/train_reference.py's command line: an unknown --arms name stops before any work, naming the arms."""
import pytest

from benchmarks.train_reference import main


def test_unknown_arm_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--arms", "+ mined hard negatives", "--arms", "in-batch info-NCE, hard batche", "--work", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown ['in-batch info-NCE, hard batche']" in err and "'in-batch info-NCE, hard batches'" in err
    assert not any(tmp_path.iterdir())  # nothing mined, nothing written
