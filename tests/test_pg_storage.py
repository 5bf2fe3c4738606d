"""Two worker processes share one optuna study on a real PostgreSQL server (the fixture starts one).

This is how the budget search distributes trials (`--storage postgresql+psycopg://...`): every worker
loads the same study by name and asks the database for its next trial. None may be lost or duplicated.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from tests import pg

TRIALS_PER_WORKER = 15
WORKERS = 2

# One worker: waits for the go file so that both really run at once, then runs its trials, each
# recording which worker ran it. Arguments: storage URL, study name, worker name, trial count, go file.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import optuna

    url, study_name, worker, trials, go = sys.argv[1:6]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(url))
    deadline = time.monotonic() + 60
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.01)

    def objective(trial):
        trial.set_user_attr("worker", worker)
        x = trial.suggest_float("x", -10.0, 10.0)
        return (x - 2.0) ** 2

    study.optimize(objective, n_trials=int(trials))
    """
)


def test_two_workers_share_one_study_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(postgres_url)
    assert storage.engine.dialect.name == "postgresql"
    # The parent creates the tables and the study, so the workers only load it.
    optuna.create_study(study_name="shared", storage=storage, direction="minimize")

    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, "shared", f"w{index}", str(TRIALS_PER_WORKER), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(WORKERS)
    ]
    go.touch()
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    total = WORKERS * TRIALS_PER_WORKER
    assert len(trials) == total
    assert sorted(trial.number for trial in trials) == list(range(total))
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    for name in (f"w{index}" for index in range(WORKERS)):
        assert sum(trial.user_attrs["worker"] == name for trial in trials) == TRIALS_PER_WORKER
    for trial in trials:
        assert trial.value == pytest.approx((trial.params["x"] - 2.0) ** 2)


def test_without_initdb_the_server_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "find_bin_dir", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="initdb not on PATH"), pg.postgres_server():
        pytest.fail("the server must not start without initdb")
