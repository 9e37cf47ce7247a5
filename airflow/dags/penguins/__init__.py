"""Plain-Python logic of the penguins pipeline.

Nothing in this package imports Airflow: the DAG in ``penguins_pipeline.py`` wires these
functions into tasks, and the tests call them directly.
"""
