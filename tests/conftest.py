import os
import tempfile

from creditflow.flows.env import apply_defaults

# Hermetic Prefect: its own home (DB, profiles) per test session, no user server, no remote MLflow.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="creditflow-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("CREDITFLOW_WORKSPACE", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
apply_defaults()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
