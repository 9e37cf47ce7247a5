"""Benchmarks of the pipeline: ``uv run python -m tests.benchmarks [section ...]``.

Not part of the test run: no module here is named ``test_*``. See ``__main__.py``.
"""

import sys
from pathlib import Path

# The pipeline's code (``penguins``) lives beside the DAG, not in an installed package. pytest
# puts it on the path (pyproject's ``pythonpath``); ``python -m tests.benchmarks`` and the worker
# processes it starts need it put there too.
_DAGS_FOLDER = str(Path(__file__).resolve().parents[2] / "airflow" / "dags")
if _DAGS_FOLDER not in sys.path:
    sys.path.insert(0, _DAGS_FOLDER)
