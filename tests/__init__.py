"""The project's tests; ``python -m tests.benchmarks`` runs the benchmarks."""

import sys
from pathlib import Path

# The no-Docker launcher's modules (airflow/*.py) are scripts beside the DAGs folder, not a
# package: the name `airflow` is Apache Airflow's. Tests and benchmarks import them from there.
sys.path.append(str(Path(__file__).resolve().parents[1] / "airflow"))
