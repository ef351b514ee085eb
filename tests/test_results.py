"""metrics.json typed (server/results.py): a hostile or malformed file is one line naming the
file and the field; a file written before the typed results reads, and writes back the same."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from server.report import write_outputs
from server.results import ResultsError, RunResults, load_results

# A real run's folder as fedskin wrote it before metrics.json was typed: 2 rounds under
# sample-level DP with the LDA head refit (fedskin simulate --run-config "builtin-images=300
# image-size=16 num-server-rounds=2 local-steps=2 dp=true head-calibration='lda'
# augment=false", at commit 1f39f7e).
BEFORE = Path(__file__).parent / "golden" / "run_dp_lda"


def _run_dir(tmp_path: Path, metrics: object) -> Path:
    (tmp_path / "metrics.json").write_text(
        metrics if isinstance(metrics, str) else json.dumps(metrics)
    )
    return tmp_path


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    return text[len(f"{path}: ") :]


@pytest.mark.parametrize(
    ("metrics", "says"),
    [
        ("{", "not JSON"),
        ("[1, 2]", "not a JSON object (list)"),
        ({"rounds": "all"}, "rounds: Input should be a valid list"),
        ({"rounds": [{"seconds": 1.0}]}, "rounds.0.round: Field required"),
        ({"rounds": [{"round": "1"}]}, "rounds.0.round: Input should be a valid integer"),
        ({"rounds": [{"round": True}]}, "rounds.0.round: Input should be a valid integer"),
        ({"rounds": [{"round": 1, "seconds": "9"}]}, "rounds.0.seconds: expected a number"),
        ({"best_round": 1.5}, "best_round: Input should be a valid integer"),
        ({"config": {"strategy": "x"}}, "config: strategy='x': must be one of fedavg"),
        ({"config": []}, "config: Input should be a valid dictionary"),
        ({"test": {"global": {"balanced_accuracy": "0.9"}}}, "test.global.balanced_accuracy"),
        ({"test": {"head_calibration": {"kept": "yes"}}}, "test.head_calibration.kept"),
        (
            {"test": {"sites": {"a\n\x1b[2Jb": {"num-examples": None}}}},
            "test.sites.'a\\n\\x1b[2Jb'.num-examples: expected a number, not NoneType",
        ),
    ],
)
def test_a_malformed_metrics_json_is_one_line_naming_the_file_and_field(
    tmp_path: Path, metrics: object, says: str
) -> None:
    run_dir = _run_dir(tmp_path, metrics)
    with pytest.raises(ResultsError) as err:
        load_results(run_dir)
    assert says in _one_line(err, run_dir / "metrics.json")


def test_a_missing_metrics_json_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ResultsError) as err:
        load_results(tmp_path)
    assert "no metrics.json" in _one_line(err, tmp_path / "metrics.json")


def test_a_run_written_before_the_typed_results_reads_and_writes_back_the_same(
    tmp_path: Path,
) -> None:
    before = json.loads((BEFORE / "metrics.json").read_text())
    results = load_results(BEFORE)
    assert results.to_json() == before  # every key and value, unnamed ones included
    # what the readers see, against the file itself
    assert results.run.dp and results.run.head_calibration == "lda"
    assert [r.round for r in results.rounds] == [1, 2] and results.best_round == 1
    assert results.test is not None and results.test.head_calibration is not None
    refit = before["test"]["head_calibration"]
    assert results.test.head_calibration.epsilon == refit["epsilon"]
    assert results.epsilons() == refit["epsilon"]  # the refit's release ends each total
    assert results.test.pooled.balanced_accuracy == before["test"]["global"]["balanced_accuracy"]
    assert math.isnan(results.test.pooled.metric("recall_df"))  # an unnamed key, NaN kept
    # written again by the one writer: the same metrics.json, history.csv and report.md
    write_outputs(tmp_path, results, plots=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == before
    for name in ("history.csv", "report.md"):
        assert (tmp_path / name).read_text() == (BEFORE / name).read_text(), name


def test_the_loop_records_are_checked_as_they_will_be_read(tmp_path: Path) -> None:
    """numpy numbers from the loop land as JSON numbers; a record the file could not
    hold is refused when written, not when read."""
    import numpy as np

    rounds = [{"round": 1, "seconds": np.float64(2.5), "central": {"epsilon": np.float32(1)}}]
    results = RunResults.of({}, ["a", "b"], rounds, None, 1)
    assert results.rounds[0].seconds == 2.5 and results.central() is not None
    write_outputs(tmp_path, results, plots=False)
    assert load_results(tmp_path).to_json() == results.to_json()
    with pytest.raises(ResultsError, match=r"rounds\.0\.round: Field required"):
        RunResults.of({}, [], [{"seconds": 1.0}], None, 0)
