"""The runnable example of docs/epochs.md runs as documented."""
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_epoch_loop_example(ray_session, tmp_path, capsys):
    import epoch_loop

    assert epoch_loop.main(["--out", str(tmp_path / "loop"), "--epochs", "3", "--steps", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch ")]
    assert [x.split(":")[1].split()[0] for x in lines] == ["mined", "re-sampled", "mined"]
    assert "_checkpoints/epoch=0002" in lines[2]
    for e in range(3):
        assert pq.read_table(tmp_path / "loop" / f"epoch={e:04d}").num_rows == 1800
